"""Secure aggregation in the aggregator's rounds: the masked-sum accumulator that takes the strategy's place.

With ``--secure-aggregation`` the run's strategy is a ``SecureSum``: chosen once per run, it
looks to the round loop like any streaming strategy, and it is the whole new stage.

- ``begin_round``: the coordinator's keys and shares stages (fedq.protocol.secagg.exchange), before
  any update can arrive; the clients who shared are the only ones whose update the round takes
  (``eligible``).
- ``add``: folds a masked uint32 vector (judged against ``wire_template``: one uint32 vector of the
  model's size plus one, the weight) into the round's sum modulo 2^32. Nothing else is kept.
- ``result``: publishes the survivors, collects their reveals, unmasks the sum and decodes it into
  the weighted mean delta (``--dp central``: the clipped deltas' sum, noised and divided by the
  planned clients), then applies the strategy's server step (fedavgm, fedadam, ... work as usual).
- ``round_keys``: the round's secure-aggregation keys, deleted by the commit.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedq.errors import SecAggError
from fedq.learning.privacy import gaussian_noise
from fedq.learning.spec import RunSpec
from fedq.learning.strategies import Strategy
from fedq.protocol import heartbeat, messages
from fedq.protocol.secagg.exchange import Coordinator
from fedq.protocol.secagg.masking import add_into
from fedq.protocol.secagg.quantise import decode_update, dequantise_sum
from fedq.protocol.store import RunStore

WIRE_NAME = "secagg/masked"  # the one tensor of a masked update
STAGES = ("keys", "shares", "reveal")  # what each client writes per round
RECORDS = ("roster", "sharers", "survivors")  # what the aggregator publishes per round


def wire_template(template: Sequence[messages.TensorSpec]) -> list[messages.TensorSpec]:
    """What a masked update must look like: one uint32 vector, the model's values and the weight."""
    size = sum(math.prod(t.shape) for t in template)
    return [messages.TensorSpec(WIRE_NAME, np.dtype(np.uint32).str, (size + 1,))]


def graph_seed(run_id: str, seed: int, round_no: int) -> bytes:
    """The round's communication-graph seed: public, and the same for a driver that resumes the round."""
    return hashlib.sha256(f"fedq-secagg-graph|{run_id}|{seed}|{round_no}".encode()).digest()


class SecureSum(Strategy):
    """The strategy of a run with secure aggregation (see the module's docstring)."""

    def __init__(self, spec: RunSpec, template: Sequence[np.ndarray], store: RunStore,
                 tick: Callable[[], None], block_seconds: float = 1.0) -> None:
        super().__init__(spec.strategy, template)  # its server step; central DP is done here
        self.run_spec = spec
        self.params = spec.secagg_params()
        self.store = store
        self._tick = tick
        self._block = block_seconds
        self._shapes = [np.shape(t) for t in template]
        self._sum = np.zeros(sum(math.prod(s) for s in self._shapes) + 1, dtype=np.uint32)
        self._added: dict[str, None] = {}  # the clients folded, in order
        self._rng: np.random.Generator | None = None
        self._wanted: set[str] = set()
        self._seen_alive: set[str] = set()  # clients whose heartbeat a stage has seen
        self._info: dict[str, Any] = {}
        self._weight = 0.0
        self.coordinator: Coordinator | None = None

    # --- what the round loop asks of a strategy ------------------------------------------------
    @property
    def holds_all(self) -> bool:
        return False

    @property
    def streams_parts(self) -> bool:
        return False  # a masked update sent in parts is put together, then folded

    @property
    def streams_result(self) -> bool:
        return False  # decoding needs the round's global model

    @property
    def total_examples(self) -> int:
        """The survivors' capped sample counts (known from their sum only, after ``result``)."""
        return round(self._weight * self.params.max_weight)

    @property
    def count(self) -> int:
        return len(self._added)

    def begin_round(self, global_weights: Sequence[np.ndarray] | None,
                    noise_rng: np.random.Generator | None = None) -> None:
        """Start the round: the keys and shares stages with the clients due an update."""
        if self.run_spec.central_dp is not None and noise_rng is None:
            raise ValueError("central DP needs the round's noise generator (noise_rng)")
        super().begin_round(global_weights)
        self._rng = noise_rng
        self._weight = 0.0
        round_no = self.store.committed_round() + 1
        spec = self.run_spec
        chosen = self.store.selected(round_no) if spec.sampled else None
        self._wanted = set(self.store.member_ids() if chosen is None else chosen)
        co = Coordinator(self.store.r, self.store.k, round_no, self.params,
                         graph_seed(spec.run_id, spec.seed, round_no), block_seconds=self._block,
                         driver=self.store.driver or "", tick=self._tick, gone=self._gone)
        self.coordinator = co
        t0 = time.perf_counter()
        roster = co.setup(sorted(self._wanted), self._deadline())
        t1 = time.perf_counter()
        record = co.share(self._deadline())
        self._info = {"roster": len(roster), "sharers": len(record.commitments),
                      "refused": dict(sorted(co.refused.items())),
                      "setup_seconds": t1 - t0, "share_seconds": time.perf_counter() - t1}

    def _deadline(self) -> float:
        """A stage waits as long as a round may (its deadline and retries), or until only clients
        whose heartbeat expired are left (_gone)."""
        return time.monotonic() + self.run_spec.round_timeout * (self.run_spec.round_retries + 1)

    def _gone(self, awaited: list[str]) -> set[str]:
        """Of the awaited clients, those seen alive before whose heartbeat has expired since (one
        not seen yet may still be starting its heartbeat: it is waited for)."""
        beats = heartbeat.client_heartbeats(self.store.r, self.store.run_id, awaited)
        self._seen_alive.update(beats)
        return {c for c in awaited if c in self._seen_alive and c not in beats}

    def eligible(self) -> set[str]:
        """The clients whose masked update the round can take: those whose shares it holds."""
        if self.coordinator is None or self.coordinator.record is None:
            return set()
        return set(self.coordinator.record.commitments)

    def add(self, tensors: Sequence[np.ndarray], num_examples: int, client_id: str = "") -> None:
        """Fold one masked vector (judged against wire_template) into the sum modulo 2^32."""
        if len(tensors) != 1 or tensors[0].shape != self._sum.shape or tensors[0].dtype != np.uint32:
            raise ValueError(f"a masked update is one uint32 vector of {self._sum.size} values")
        if client_id in self._added:
            raise ValueError(f"{client_id} was folded already")  # a re-push is refolded from reset()
        add_into(self._sum, tensors[0])
        self._added[client_id] = None

    def reset(self) -> None:
        super().reset()
        self._sum.fill(0)
        self._added = {}

    def result(self) -> list[np.ndarray]:
        """Unmask the survivors' sum and take the server step on the decoded model."""
        co, base = self.coordinator, self._global
        if co is None or base is None:
            raise ValueError("begin_round() must come before result()")
        survivors = list(self._added)
        t0 = time.perf_counter()
        got = co.unmask(self._sum, survivors, self._deadline())
        dp = self.run_spec.central_dp
        if dp is None:
            model, self._weight = decode_update(got.total, len(survivors), base, self.params)
        else:
            model = self._noisy(got.total, len(survivors), base)
        dropped = sorted(set(self.eligible()) - set(survivors))
        self._info.update(survivors=len(survivors), dropped=dropped, unmask_seconds=time.perf_counter() - t0,
                          adopted=list(co.adopted),
                          bad_holders={o: sorted(h) for o, h in sorted(got.bad_holders.items())})
        return self._server.step(base, model)

    def _noisy(self, total: np.ndarray, count: int, base: list[np.ndarray]) -> list[np.ndarray]:
        """--dp central: global + (sum of the clients' clipped deltas + N(0, (z C)^2)) / D, each client
        weighing 1 (it sends its delta clipped to C, at full weight): DP-FedAvg on the unmasked sum."""
        dp, rng = self.run_spec.central_dp, self._rng
        assert dp is not None and rng is not None  # begin_round checked both
        values = dequantise_sum(total, count, self.params)
        self._weight = float(values[-1])
        if not 0.5 < self._weight / count < 1.5:  # each client sends weight 1: anything else is not ours
            raise SecAggError("bad_weight", f"{count} clients sent a total weight of {self._weight:.3f}, "
                                            f"not {count}: a client did not send its clipped delta at weight 1")
        noise = gaussian_noise(self._shapes, dp.noise_multiplier * dp.clip, rng)
        out, at = [], 0
        for g, shape, n in zip(base, self._shapes, noise):
            size = math.prod(shape)
            delta = (values[at:at + size].reshape(shape) + n) / dp.denominator
            at += size
            out.append((np.asarray(g, dtype=np.float64) + delta).astype(np.asarray(g).dtype))
        return out

    def round_info(self) -> dict[str, Any]:
        return {"secure_aggregation": dict(self._info)}

    def round_keys(self, round_no: int) -> list[str]:
        """Every key of the round's secure-aggregation messages (deleted with the commit)."""
        k = self.store.k
        clients = sorted(self._wanted)
        return ([k.secagg(c, round_no, s) for c in clients for s in STAGES]
                + [k.secagg_public(round_no, w) for w in RECORDS]
                + [k.secagg_inbox(round_no, c) for c in clients] + [k.secagg_hints])


def eligible(strategy: Strategy) -> set[str] | None:
    """The clients a round may take an update from under secure aggregation (None: no such limit)."""
    return strategy.eligible() if isinstance(strategy, SecureSum) else None


def round_keys(strategy: Strategy, round_no: int) -> list[str]:
    """The round's secure-aggregation keys for the commit to delete ([] without it)."""
    return strategy.round_keys(round_no) if isinstance(strategy, SecureSum) else []
