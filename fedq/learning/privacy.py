"""Differential privacy: update clipping, Gaussian noise and the privacy accountant (pure numpy).

Two modes, chosen by the run spec's ``dp``:

``central`` (DP-FedAvg, McMahan et al., 2018, "Learning differentially private recurrent
language models"). The aggregator clips each client's update ``model - global`` to L2 norm
``C`` (``dp_clip``), sums the clipped updates with weight 1 each, adds Gaussian noise of
standard deviation ``z * C`` (``z``: ``dp_noise``, the noise multiplier) to the sum, and divides
by a fixed denominator ``D``, the clients planned per round. Adding or removing one client moves
the sum by at most ``C`` whatever its data and whatever sample count it claims, so each round is
a Gaussian mechanism of sensitivity ``C`` and noise multiplier ``z``: client-level DP for the
sequence of global models, against anyone who sees them (clients included), with a trusted
aggregator. See ``NoisyMean`` for why updates are not weighted by sample counts.

``local``. Each client clips its own update to ``C`` and adds ``N(0, (z C)^2)`` to every
coordinate before pushing, so the aggregator (and Redis) never see an un-noised update. Any
two clipped updates differ by at most ``2 C``, so each push is a Gaussian mechanism with noise
multiplier ``z / 2`` with respect to everything the client holds.

The accountant (``epsilon``) composes one Gaussian mechanism per round with Google's
``dp-accounting`` RDP accountant and converts to (epsilon, delta). It does not claim privacy
amplification by client sampling: fedq's ``--fraction-fit`` choice is a fixed-size draw from
the public run seed and is published in Redis and the round metrics, so an observer can know
who took part, and amplification needs a secret (Poisson) sample. A client is counted as taking
part in every round, which is an upper bound on what it spends.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedq.errors import ConfigError
from fedq.learning import choices

MODES = choices.DP_MODES
DEFAULT_DELTA = choices.DEFAULT_DELTA
ACCOUNTANT = "rdp"  # dp_accounting.rdp.RdpAccountant, default orders
# What (epsilon, delta) means in each mode (report.json repeats it).
GUARANTEES = {
    "central": "client-level (epsilon, delta)-DP of the sequence of global models: adding or removing one "
               "client's whole data changes their distribution by at most (epsilon, delta); the aggregator is "
               "trusted (it sees clipped, un-noised updates)",
    "local": "each client's pushed updates are (epsilon, delta)-DP with respect to all its data, whatever the "
             "aggregator or Redis do; the aggregator need not be trusted with the updates",
}
# Combiners whose output moves by at most C when one clipped update is added or removed: the
# noise calibration above holds only for them (fedq.learning.strategies names its combiners).
CENTRAL_COMBINERS = ("mean",)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate(mode: str, clip: float | None, noise: float | None, delta: float, *, clients: int,
             combiner: str, strategy: str, clip_norm: float | None) -> None:
    """ConfigError naming the first bad DP setting of a run (mode off: no DP option may be set)."""
    if mode not in MODES:
        raise ConfigError(f"unknown dp mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "off":
        given = [f"--dp-{n}" for n, v in (("clip", clip), ("noise", noise)) if v is not None]
        if given:
            raise ConfigError(f"{' and '.join(given)} {'need' if len(given) > 1 else 'needs'} "
                              f"--dp central or --dp local")
        return
    if clip is None:
        raise ConfigError(f"--dp {mode} needs --dp-clip C (the L2 norm each update is clipped to)")
    if noise is None:
        raise ConfigError(f"--dp {mode} needs --dp-noise Z (the noise multiplier: noise std = Z x C)")
    if not (_is_num(clip) and clip > 0):
        raise ConfigError(f"dp clip must be a positive number, got {clip!r}")
    if not (_is_num(noise) and noise > 0):
        raise ConfigError(f"dp noise must be a positive number (0 gives no privacy), got {noise!r}")
    if not (_is_num(delta) and 0 < delta < 1):
        raise ConfigError(f"dp delta must be in (0, 1), got {delta!r}")
    if delta >= 1.0 / clients:
        raise ConfigError(f"dp delta {delta:g} must be below 1/clients ({1.0 / clients:g}): a larger delta "
                          f"allows releasing one client's data outright")
    if mode == "central":
        if combiner not in CENTRAL_COMBINERS:
            raise ConfigError(f"--dp central needs a mean-based strategy (fedavg, fedprox, fedavgm, fedadam, "
                              f"fedyogi, fedadagrad); {strategy} does not bound one client's effect on the "
                              f"aggregate by the clip norm, so the noise would not be calibrated. Use --dp local "
                              f"with {strategy}")
        if clip_norm is not None:
            raise ConfigError("--clip-norm and --dp central both clip updates; use --dp-clip alone")


# --- clipping and noise ----------------------------------------------------------------------
def _floating(t: np.ndarray) -> bool:
    return bool(np.issubdtype(np.asarray(t).dtype, np.floating))


def l2_norm(update: Sequence[np.ndarray]) -> float:
    """L2 norm over all floating tensors of an update (other dtypes are not trained)."""
    return math.sqrt(sum(float(np.square(np.asarray(u, dtype=np.float64)).sum()) for u in update if _floating(u)))


def clip(update: Sequence[np.ndarray], max_norm: float) -> tuple[list[np.ndarray], float]:
    """(update scaled to L2 norm at most max_norm, as float64; the norm it had)."""
    norm = l2_norm(update)
    scale = 1.0 if norm <= max_norm else max_norm / norm
    return [np.asarray(u, dtype=np.float64) * scale if _floating(u) else np.asarray(u) for u in update], norm


def gaussian_noise(shapes: Sequence[tuple[int, ...]], std: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Independent N(0, std^2) draws, one float64 array per shape."""
    return [rng.normal(0.0, std, size=s) for s in shapes]


def noise_rng(key: str, run_id: str, seed: int, round_no: int) -> np.random.Generator:
    """The generator of a round's central noise.

    With a key (``FEDQ_DP_NOISE_KEY``, a secret every aggregator of the run shares): a function
    of (key, run id, run seed, round), so a driver that takes a run over draws the same noise.
    Without one: fresh OS entropy. Never the run seed alone: the seed is in the spec, which every
    client reads, and noise an observer can regenerate protects nothing. Fresh noise for a round
    redone after a crash is safe: only one result of a round is ever committed."""
    if not key:
        return np.random.default_rng()
    digest = hashlib.sha256(f"fedq-dp\0{key}\0{run_id}\0{int(seed)}\0{int(round_no)}".encode()).digest()
    return np.random.default_rng(np.frombuffer(digest, dtype=np.uint32))


def privatize(model: Sequence[np.ndarray], global_weights: Sequence[np.ndarray], max_norm: float,
              noise_multiplier: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Local DP: global + clip(model - global, C) + N(0, (z C)^2), in each tensor's dtype.

    Tensors that are not floating point (never trained) are sent as the global model has them."""
    if len(model) != len(global_weights):
        raise ValueError(f"expected {len(global_weights)} tensors, got {len(model)}")
    g64 = [np.asarray(g, dtype=np.float64) if _floating(g) else np.asarray(g) for g in global_weights]
    update = [np.asarray(m, dtype=np.float64) - g if _floating(g) else np.zeros(0) for m, g in zip(model, g64)]
    clipped, _ = clip(update, max_norm)
    std = noise_multiplier * max_norm
    out = []
    for m, g, u in zip(model, g64, clipped):
        m = np.asarray(m)
        if not _floating(m):
            out.append(np.asarray(g).astype(m.dtype))
            continue
        out.append((g + u + rng.normal(0.0, std, size=u.shape)).astype(m.dtype))
    return out


# --- central DP: the noisy fixed-denominator mean --------------------------------------------
@dataclass(frozen=True)
class CentralDP:
    """The central-DP settings a strategy needs: clip C, noise multiplier z, denominator D."""

    clip: float
    noise_multiplier: float
    denominator: int

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on each coordinate of the averaged update: z C / D."""
        return self.noise_multiplier * self.clip / self.denominator


class NoisyMean:
    """DP-FedAvg's combiner: global + (sum of clipped updates + N(0, (z C)^2)) / D.

    Every accepted update counts with weight 1 and the denominator D is fixed (the clients
    planned per round), not the number that arrived or their sample counts. Weighting by the
    sample count a client claims would let one client scale its own share (its count is its
    word, and dividing by the round's total makes every other client's share depend on it too),
    so one client's effect on the result would not be bounded by C / D and the noise would not
    be calibrated. A round closed with fewer than D updates (quorum) gives a shrunken step,
    never a larger one: the sensitivity stays C / D. Memory: one float64 model (streaming)."""

    holds_all = False

    def __init__(self, template: Sequence[np.ndarray], dp: CentralDP) -> None:
        if dp.denominator < 1:
            raise ValueError(f"denominator must be at least 1, got {dp.denominator}")
        self.dp = dp
        self._shapes = [np.shape(t) for t in template]
        self._dtypes = [np.asarray(t).dtype for t in template]
        self._sum = [np.zeros(s, dtype=np.float64) for s in self._shapes]
        self._global: list[np.ndarray] | None = None
        self.total_examples = 0
        self.count = 0

    def begin(self, global_weights: Sequence[np.ndarray]) -> None:
        """Start a round from this global model (updates are measured from it)."""
        self._global = [np.asarray(g) for g in global_weights]
        self.reset()

    def add(self, tensors: Sequence[np.ndarray], num_examples: int, client_id: str = "") -> None:
        """Clip one client's update (model - global) to C and add it to the round's sum."""
        if self._global is None:
            raise ValueError("begin() must come before add()")
        if len(tensors) != len(self._sum):
            raise ValueError(f"expected {len(self._sum)} tensors, got {len(tensors)}")
        for t, s in zip(tensors, self._shapes):
            if np.shape(t) != s:
                raise ValueError(f"tensor of shape {np.shape(t)} where the model has {s}")
        update = [np.asarray(t, dtype=np.float64) - g if _floating(g) else np.zeros(np.shape(g))
                  for t, g in zip(tensors, self._global)]
        clipped, _ = clip(update, self.dp.clip)
        for acc, u in zip(self._sum, clipped):
            acc += u
        self.total_examples += int(num_examples)
        self.count += 1

    def reset(self) -> None:
        """Forget the round's updates (a re-push refolds); the global model stays."""
        for acc in self._sum:
            acc.fill(0.0)
        self.total_examples = 0
        self.count = 0

    def result(self, rng: np.random.Generator) -> list[np.ndarray]:
        """The noisy mean model; draws the round's noise from rng (call once per round)."""
        if self._global is None:
            raise ValueError("begin() must come before result()")
        if self.count == 0:
            raise ValueError("no updates were aggregated")
        std = self.dp.noise_multiplier * self.dp.clip
        noise = gaussian_noise(self._shapes, std, rng)
        out = []
        for g, acc, n, dt in zip(self._global, self._sum, noise, self._dtypes):
            if not np.issubdtype(dt, np.floating):
                out.append(np.asarray(g).astype(dt))
                continue
            out.append(np.asarray(g.astype(np.float64) + (acc + n) / self.dp.denominator).astype(dt))
        return out

    def info(self) -> dict[str, Any]:
        # Per-client norms and who was clipped depend on the clients' data without noise: not published.
        return {}


# --- accounting ------------------------------------------------------------------------------
def accounting_multiplier(mode: str, noise_multiplier: float) -> float:
    """Noise std over sensitivity of one round: z (central, add/remove a client) or z / 2 (local:
    any two clipped updates differ by at most 2 C)."""
    if mode == "central":
        return noise_multiplier
    if mode == "local":
        return noise_multiplier / 2.0
    raise ValueError(f"no accounting for dp mode {mode!r}")


def load_accountant() -> None:
    """Import dp-accounting (and SciPy under it): about 1.8 s of CPU on a small machine, which
    the first round's record would otherwise pay inside the round, where a driver renews its
    lease only between steps (under load it outlasted a 15 s lease). Called before driving."""
    import dp_accounting  # noqa: F401


def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon at this delta after `rounds` Gaussian mechanisms of this noise multiplier (std over
    L2 sensitivity), composed with dp-accounting's RDP accountant."""
    import dp_accounting

    if rounds < 1:
        return 0.0
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise_multiplier), rounds))
    return float(accountant.get_epsilon(delta))


def round_metrics(mode: str, clip_norm: float, noise_multiplier: float, delta: float, rounds: int,
                  denominator: int | None = None) -> dict[str, Any]:
    """What a round's metrics record says about privacy after `rounds` rounds."""
    out: dict[str, Any] = {
        "dp_epsilon": epsilon(accounting_multiplier(mode, noise_multiplier), rounds, delta),
        "dp_delta": delta,
    }
    if mode == "central" and denominator:
        out["dp_noise_std"] = CentralDP(clip_norm, noise_multiplier, denominator).noise_std
    return out
