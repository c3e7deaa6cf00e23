"""Server strategies: how a round's client updates become the next global model.

Pure numpy, free of Redis and Keras. A strategy is three steps, each chosen by the run's
``StrategySpec``::

    clip (optional)  ->  combine                         ->  server step
    update-norm        mean | median | trimmed | krum       replace | momentum | adam | yogi | adagrad

``--strategy`` names the usual pairs: fedavg and fedprox (mean, replace; FedProx adds a
proximal term to client training), fedavgm (mean, momentum), fedadam / fedyogi /
fedadagrad (mean, adaptive), fedmedian, trimmed-mean, krum and multi-krum (robust, replace).

The one interface the aggregator uses (``Strategy``)::

    s = Strategy(spec, template)          # template: the model's tensors
    s.begin_round(global_weights)         # a round starts from this global model
                                          # (central DP: and noise_rng=, the round's noise source)
    s.add(tensors, num_examples, client)  # each accepted update (streaming for the mean)
    s.reset()                             # forget the round's updates (a re-push refolds)
    new_global = s.result()               # combine + server step; advances server state
    raw = s.state_bytes(round_no)         # server state after that round (None: stateless)
    s.load_state(raw, round_no)           # a resumed driver continues where the last stopped

``aggregate_all(spec, updates, global)`` is the all-at-once form of the same computation.

Central differential privacy (``Strategy(spec, template, dp=CentralDP(...))``, fedq.learning.privacy)
replaces the combiner by DP-FedAvg's noisy mean of clipped updates; the server step then works
on that noisy model (post-processing: DP-FedAdam etc. keep the guarantee).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

from fedq.errors import CodecError, ConfigError
from fedq.learning.privacy import CentralDP, NoisyMean
from fedq.learning.strategies.robust import Buffered, Mean, make_combiner
from fedq.learning.strategies.sampling import sample_size, select_clients
from fedq.learning.strategies.server import ServerStep, make_server_step
from fedq.protocol import codec

__all__ = ["STRATEGIES", "Strategy", "StrategySpec", "aggregate_all", "clip_update", "held_bytes",
           "sample_size", "select_clients"]

KIND_STATE = "strategy-state"

# name -> (combiner, server optimiser)
_PARTS: dict[str, tuple[str, str]] = {
    "fedavg": ("mean", "replace"),
    "fedprox": ("mean", "replace"),
    "fedavgm": ("mean", "momentum"),
    "fedadam": ("mean", "adam"),
    "fedyogi": ("mean", "yogi"),
    "fedadagrad": ("mean", "adagrad"),
    "fedmedian": ("median", "replace"),
    "trimmed-mean": ("trimmed", "replace"),
    "krum": ("krum", "replace"),
    "multi-krum": ("krum", "replace"),
}
STRATEGIES = tuple(_PARTS)

# Defaults of the hyper-parameters a strategy uses (None in the spec means "this default").
_DEFAULTS: dict[str, dict[str, float]] = {
    "fedprox": {"mu": 0.1},
    "fedavgm": {"server_lr": 1.0, "momentum": 0.5},
    "fedadam": {"server_lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedyogi": {"server_lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedadagrad": {"server_lr": 0.1, "beta1": 0.0, "beta2": 0.0, "tau": 1e-3},
}
# Chosen on the built-in data, 5 clients, Dirichlet alpha 0.3, 10 rounds (see experiments/):
# momentum 0.9 at server rate 1.0 oscillates; adaptive rates 0.01-0.03 converge slowly.
_OPTIONAL = ("server_lr", "momentum", "beta1", "beta2", "tau", "mu")


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class StrategySpec:
    """A run's strategy and its hyper-parameters (stored in the run spec)."""

    name: str = "fedavg"
    server_lr: float | None = None  # server learning rate (fedavgm, fedadam, fedyogi, fedadagrad)
    momentum: float | None = None  # fedavgm's server momentum
    beta1: float | None = None  # adaptive: first-moment decay
    beta2: float | None = None  # adam / yogi: second-moment decay
    tau: float | None = None  # adaptive: the degree of adaptivity (added to sqrt(v))
    mu: float | None = None  # FedProx proximal term in client training (any strategy; fedprox: 0.1)
    trim_fraction: float = 0.2  # trimmed-mean: share dropped at each end
    byzantine: int = 1  # krum: clients assumed malicious (f)
    krum_keep: int | None = None  # krum: updates kept (m); default 1 (krum) or n - f (multi-krum)
    clip_norm: float | None = None  # clip each update's L2 norm (update = model - global) to this
    max_held_mb: float = 1024.0  # cap of a robust strategy's held updates (N x model size), MiB

    # --- derived --------------------------------------------------------------------------
    @property
    def combiner(self) -> str:
        return _PARTS[self.name][0]

    @property
    def server(self) -> str:
        return _PARTS[self.name][1]

    @property
    def holds_all(self) -> bool:
        """True when the strategy keeps every update of a round in memory (the robust ones)."""
        return self.combiner != "mean"

    def value(self, name: str) -> float:
        """A hyper-parameter with this strategy's default filled in (0 when unused)."""
        v = getattr(self, name)
        return float(v) if v is not None else float(_DEFAULTS.get(self.name, {}).get(name, 0.0))

    @property
    def proximal_mu(self) -> float:
        """The FedProx proximal coefficient client training uses (0: none)."""
        return self.value("mu")

    def resolved(self) -> StrategySpec:
        """The spec with every default made explicit (what a report shows)."""
        used = set(_DEFAULTS.get(self.name, {})) | {n for n in _OPTIONAL if getattr(self, n) is not None}
        values: dict[str, Any] = {n: self.value(n) for n in used}
        return replace(self, **values)

    # --- checks and (de)serialisation -------------------------------------------------------
    def validate(self, expected_clients: int) -> StrategySpec:
        """ConfigError naming the first bad field; expected_clients: updates a round plans for."""
        if self.name not in _PARTS:
            raise ConfigError(f"unknown strategy {self.name!r}; choose one of {', '.join(STRATEGIES)}")
        for n in ("server_lr", "tau", "clip_norm", "max_held_mb"):
            v = getattr(self, n)
            if v is not None and not (_is_num(v) and math.isfinite(v) and v > 0):
                raise ConfigError(f"{n.replace('_', ' ')} must be a positive number, got {v!r}")
        for n in ("momentum", "beta1", "beta2"):
            v = getattr(self, n)
            if v is not None and not (_is_num(v) and 0.0 <= v < 1.0):
                raise ConfigError(f"{n} must be in [0, 1), got {v!r}")
        if self.mu is not None and not (_is_num(self.mu) and math.isfinite(self.mu) and self.mu >= 0):
            raise ConfigError(f"mu must be 0 or more, got {self.mu!r}")
        if not (_is_num(self.trim_fraction) and 0.0 <= self.trim_fraction < 0.5):
            raise ConfigError(f"trim fraction must be in [0, 0.5), got {self.trim_fraction!r}")
        if not isinstance(self.byzantine, int) or isinstance(self.byzantine, bool) or self.byzantine < 0:
            raise ConfigError(f"byzantine must be a whole number 0 or more, got {self.byzantine!r}")
        if self.krum_keep is not None and (not isinstance(self.krum_keep, int) or isinstance(self.krum_keep, bool)
                                           or not 1 <= self.krum_keep <= max(expected_clients, 1)):
            raise ConfigError(f"krum keep must be between 1 and the clients per round ({expected_clients}), "
                              f"got {self.krum_keep!r}")
        if self.combiner == "krum" and expected_clients < 2 * self.byzantine + 3:
            raise ConfigError(f"{self.name} with byzantine {self.byzantine} needs at least "
                              f"{2 * self.byzantine + 3} clients per round (n > 2f + 2), "
                              f"the run has {expected_clients}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> StrategySpec:
        """Inverse of to_dict; unknown fields are an error."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"strategy spec must be a mapping, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"strategy spec has unknown fields: {sorted(unknown)}")
        values = dict(raw)
        for n in ("server_lr", "momentum", "beta1", "beta2", "tau", "mu", "trim_fraction", "clip_norm", "max_held_mb"):
            if values.get(n) is not None and _is_num(values[n]):
                values[n] = float(values[n])  # JSON may hand back 1 for 1.0
        return cls(**values)


# --- clipping -----------------------------------------------------------------------------
def update_norm(tensors: Sequence[np.ndarray], global_weights: Sequence[np.ndarray]) -> float:
    """L2 norm of (model - global) over all floating tensors."""
    total = 0.0
    for t, g in zip(tensors, global_weights):
        if np.issubdtype(np.asarray(t).dtype, np.floating):
            total += float(np.square(np.asarray(t, dtype=np.float64) - g).sum())
    return math.sqrt(total)


def clip_update(tensors: Sequence[np.ndarray], global_weights: Sequence[np.ndarray],
                max_norm: float) -> tuple[list[np.ndarray], float, bool]:
    """(clipped model, norm of the original update, whether it was clipped).

    The update (model - global) is scaled down to max_norm when its norm exceeds it, so a
    client can move the global model at most max_norm, whatever it sends."""
    norm = update_norm(tensors, global_weights)
    if norm <= max_norm:
        return [np.asarray(t) for t in tensors], norm, False
    scale = max_norm / norm
    out = []
    for t, g in zip(tensors, global_weights):
        t = np.asarray(t)
        if np.issubdtype(t.dtype, np.floating):
            g64 = np.asarray(g, dtype=np.float64)
            out.append((g64 + (t.astype(np.float64) - g64) * scale).astype(t.dtype))
        else:
            out.append(t)
    return out, norm, True


# --- the strategy -------------------------------------------------------------------------
class Strategy:
    """One run's strategy: clipping, combiner and server optimiser behind one interface."""

    def __init__(self, spec: StrategySpec, template: Sequence[np.ndarray], dp: CentralDP | None = None) -> None:
        self.spec = spec
        self.name = spec.name
        self.dp = dp
        self._template = [np.asarray(t) for t in template]
        self._combine: Mean | Buffered | NoisyMean
        if dp is not None:
            if spec.combiner != "mean" or spec.clip_norm is not None:
                raise ConfigError(f"central DP needs a mean-based strategy without --clip-norm, not {spec.name}")
            self._combine = NoisyMean(self._template, dp)
        else:
            self._combine = make_combiner(
                spec.combiner, self._template, trim_fraction=spec.trim_fraction, byzantine=spec.byzantine,
                keep=spec.krum_keep if spec.krum_keep is not None else (1 if spec.name == "krum" else None))
        self._noise_rng: np.random.Generator | None = None
        self._server: ServerStep = make_server_step(
            spec.server, self._template, lr=spec.value("server_lr"), momentum=spec.value("momentum"),
            beta1=spec.value("beta1"), beta2=spec.value("beta2"), tau=spec.value("tau"))
        self._global: list[np.ndarray] | None = None
        self.clipped: list[str] = []
        self.norms: dict[str, float] = {}

    @property
    def holds_all(self) -> bool:
        """True: memory is the round's N updates; False: streaming, one model."""
        return self._combine.holds_all

    @property
    def total_examples(self) -> int:
        return self._combine.total_examples

    @property
    def count(self) -> int:
        return self._combine.count

    def begin_round(self, global_weights: Sequence[np.ndarray] | None,
                    noise_rng: np.random.Generator | None = None) -> None:
        """Start a round from this global model (forgets any updates held). Central DP draws
        the round's noise from noise_rng (fedq.learning.privacy.noise_rng), which it then requires.
        A strategy that streams its result needs no global model (None): the mean of the
        updates is the next one."""
        if self.dp is not None and noise_rng is None:
            raise ValueError("central DP needs the round's noise generator (noise_rng)")
        if global_weights is None and not self.streams_result:
            raise ValueError(f"strategy {self.name} needs the round's global model")
        self._global = None if global_weights is None else [np.asarray(g) for g in global_weights]
        self._noise_rng = noise_rng
        if isinstance(self._combine, NoisyMean):
            assert self._global is not None  # central DP never streams its result (checked above)
            self._combine.begin(self._global)
        self.reset()

    def add(self, tensors: Sequence[np.ndarray], num_examples: int, client_id: str = "") -> None:
        """Take one accepted update into the round (clipped first when the spec says so)."""
        if self._global is None and not self.streams_result:
            raise ValueError("begin_round() must come before add()")
        if self.spec.clip_norm is not None:
            assert self._global is not None  # clipping strategies never stream their result
            if len(tensors) != len(self._global):
                raise ValueError(f"expected {len(self._global)} tensors, got {len(tensors)}")
            tensors, norm, clipped = clip_update(tensors, self._global, self.spec.clip_norm)
            self.norms[client_id] = norm
            if clipped:
                self.clipped.append(client_id)
        self._combine.add(tensors, num_examples, client_id)

    @property
    def streams_parts(self) -> bool:
        """Whether an update sent in parts is folded part by part (a plain weighted mean);
        otherwise it is put back together first (clipping needs a whole update's norm)."""
        return isinstance(self._combine, Mean) and self.spec.clip_norm is None

    @property
    def streams_result(self) -> bool:
        """Whether the next global model is the plain weighted mean of the updates (no clipping,
        noise or server optimiser), so it can be written out slice by slice (result_slice)
        and the round needs no copy of the previous global model."""
        return self.streams_parts and not self._server.slots and self._server.kind == "replace"

    def result_slice(self, offset: int, length: int) -> np.ndarray:
        """Parameters [offset, offset + length) of the next global model, flattened (see
        streams_result); the round's result without ever holding it whole."""
        assert isinstance(self._combine, Mean) and self.streams_result
        return self._combine.result_slice(offset, length)

    def add_part(self, offset: int, values: np.ndarray, num_examples: int) -> None:
        """Fold one part of an update (see streams_parts); count_update() once all are in."""
        assert isinstance(self._combine, Mean)
        self._combine.add_part(offset, values, num_examples)

    def count_update(self, num_examples: int, client_id: str = "") -> None:
        """Count an update whose parts were all folded with add_part()."""
        assert isinstance(self._combine, Mean)
        self._combine.count_model(num_examples)

    def reset(self) -> None:
        """Forget this round's updates; the global model and server state stay."""
        self._combine.reset()
        self.clipped = []
        self.norms = {}

    def result(self) -> list[np.ndarray]:
        """The next global model. Advances the server optimiser: call once per round."""
        combine = self._combine
        if isinstance(combine, NoisyMean):
            # Central DP never streams: it needs the round's global model and noise source.
            if self._global is None or self._noise_rng is None:
                raise ValueError("begin_round() with the global model and noise_rng must come before result()")
            return self._server.step(self._global, combine.result(self._noise_rng))
        if self._global is None:
            if not self.streams_result:
                raise ValueError("begin_round() must come before result()")
            return combine.result()
        return self._server.step(self._global, combine.result())

    def step(self, current: Sequence[np.ndarray], proposal: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Only the server step, from current towards a proposed next model (buffered aggregation
        proposes its staleness-weighted one, fedq.learning.staleness). Advances the server optimiser."""
        return self._server.step(current, proposal)

    def round_info(self) -> dict[str, Any]:
        """What the round's metrics record about the strategy (clipped clients, Krum's choice)."""
        out: dict[str, Any] = dict(self._combine.info())
        if self.spec.clip_norm is not None:
            out["clipped"] = sorted(self.clipped)
            out["update_norms"] = {k: self.norms[k] for k in sorted(self.norms)}
        return out

    # --- server state ------------------------------------------------------------------------
    def state_bytes(self, round_no: int) -> bytes | None:
        """The server optimiser's state after round_no, as a codec envelope (None: stateless)."""
        if not self._server.slots:
            return None
        names, tensors, meta = self._server.state()
        return codec.encode(KIND_STATE, tensors, names=names,
                            meta={**meta, "strategy": self.name, "round": int(round_no)})

    def load_state(self, raw: bytes | None, round_no: int) -> None:
        """Restore the state saved with round_no's commit; CodecError when it does not fit."""
        if not self._server.slots:
            return
        if raw is None:
            if round_no > 0:
                raise CodecError(f"strategy {self.name} has no saved server state for round {round_no}")
            return
        env = codec.decode(raw, expect_kind=KIND_STATE)
        if env.meta.get("strategy") != self.name or env.meta.get("round") != round_no:
            raise CodecError(f"saved server state is of strategy {env.meta.get('strategy')!r} after round "
                             f"{env.meta.get('round')!r}; expected {self.name!r} after round {round_no}")
        try:
            self._server.load(env.names, env.tensors, env.meta)
        except ValueError as exc:
            raise CodecError(f"saved server state does not fit: {exc}") from None


def held_bytes(template: Sequence[np.ndarray], num_updates: int) -> int:
    """Bytes a strategy that holds all updates needs for num_updates models like template."""
    return int(num_updates) * sum(np.asarray(t).nbytes for t in template)


def aggregate_all(spec: StrategySpec, updates: Sequence[tuple[Sequence[np.ndarray], int]],
                  global_weights: Sequence[np.ndarray], strategy: Strategy | None = None) -> list[np.ndarray]:
    """All-at-once form: the next global model from (tensors, num_examples) updates.

    Pass the same ``strategy`` object round after round to keep server optimiser state."""
    s = strategy or Strategy(spec, global_weights)
    s.begin_round(global_weights)
    for i, (tensors, n) in enumerate(updates):
        s.add(tensors, n, f"u{i}")
    return s.result()
