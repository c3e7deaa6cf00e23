"""The client's stages around training: plain (encode, push) or secure aggregation's.

A round is fetch -> ``before_train`` -> train -> privatise -> ``outgoing`` -> push -> ``after_push``.
``PlainStages`` adds nothing around training and sends the (possibly compressed) weights.
``SecureStages`` (``--secure-aggregation``) runs the keys and shares stages before training, sends
the update quantised, weighted and masked (one uint32 vector) with a placeholder sample count and
timings only (a client's loss and accuracy would say something about its data), and after the
push reveals its shares for the survivors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import redis

from fedq.errors import SecAggError
from fedq.learning import privacy
from fedq.learning.spec import RunSpec
from fedq.protocol.secagg.exchange import ClientExchange
from fedq.protocol.secagg.participant import Participant
from fedq.protocol.secagg.quantise import encode_update
from fedq.protocol.store import RunStore
from fedq.protocol.vocabulary import Push, Status
from fedq.roles.secure import WIRE_NAME

log = logging.getLogger("fedq.roles.client")

# The metrics a masked update carries: timings the aggregator's round record uses, nothing learnt.
TIMINGS = ("train_seconds", "fetch_seconds", "setup_seconds", "push_time")
PLACEHOLDER_EXAMPLES = 1  # the true (capped) count travels masked, as the last coordinate


@dataclass
class Outgoing:
    """What one push sends."""

    names: list[str]
    tensors: list[np.ndarray]
    num_examples: int
    metrics: dict[str, float]
    compression: dict[str, Any] | None = None


class RoundStages(Protocol):
    def before_train(self) -> bool: ...
    def outgoing(self, names: list[str], weights: list[np.ndarray], base: list[np.ndarray], num_examples: int,
                 metrics: dict[str, float]) -> Outgoing: ...
    def after_push(self, outcome: str) -> None: ...


Encode = Callable[[list[str], list[np.ndarray], list[np.ndarray], dict[str, float]],
                  tuple[list[str], list[np.ndarray], dict[str, Any] | None]]


@dataclass
class PlainStages:
    """Nothing around training; the weights travel as ``encode`` makes them (compression)."""

    encode: Encode

    def before_train(self) -> bool:
        return True

    def outgoing(self, names: list[str], weights: list[np.ndarray], base: list[np.ndarray], num_examples: int,
                 metrics: dict[str, float]) -> Outgoing:
        wire_names, tensors, compression = self.encode(names, weights, base, metrics)
        return Outgoing(wire_names, tensors, num_examples, metrics, compression)

    def after_push(self, outcome: str) -> None:
        pass


@dataclass
class SecureStages:
    """One round's secure-aggregation stages for one client (its secrets live only here)."""

    r: redis.Redis
    st: RunStore
    spec: RunSpec
    client_id: str
    round_no: int
    block_seconds: float = 1.0
    rng: np.random.Generator = field(default_factory=np.random.default_rng)  # rounding: fresh OS entropy
    exchange: ClientExchange = field(init=False)

    def __post_init__(self) -> None:
        me = Participant(self.st.run_id, self.round_no, self.client_id, self.spec.secagg_params())
        waits = self.spec.round_timeout * (self.spec.round_retries + 1)
        self.exchange = ClientExchange(self.r, self.st.k, me, block_seconds=self.block_seconds, timeout=waits,
                                       still_waiting=self._round_open)

    def _round_open(self) -> bool:
        state = self.st.state()
        return state.get("status") == Status.RUNNING and int(state.get("round", 0)) < self.round_no

    def before_train(self) -> bool:
        """Keys and shares (they need no update). False: this client is not in the round's sum."""
        try:
            self.exchange.prepare()
            return True
        except SecAggError as exc:
            log.warning("%s round %d: secure aggregation without this client: %s", self.client_id,
                        self.round_no, exc)
            return False

    def plain_input(self, weights: list[np.ndarray], base: list[np.ndarray], num_examples: int) -> np.ndarray:
        """This client's input before masking: its delta quantised, weighted, with its weight appended.
        With --dp central it clips its own delta to C and sends it at weight 1 (DP-FedAvg's sum)."""
        params = self.exchange.me.params
        dp = self.spec.central_dp
        if dp is not None:
            delta = [np.asarray(w, dtype=np.float64) - np.asarray(b, dtype=np.float64) for w, b in zip(weights, base)]
            clipped, _ = privacy.clip(delta, dp.clip)
            weights = [np.asarray(b, dtype=np.float64) + d for b, d in zip(base, clipped)]
            num_examples = int(params.max_weight)
        return encode_update(weights, base, num_examples, params, self.rng)

    def outgoing(self, names: list[str], weights: list[np.ndarray], base: list[np.ndarray], num_examples: int,
                 metrics: dict[str, float]) -> Outgoing:
        masked = self.exchange.mask(self.plain_input(weights, base, num_examples))
        kept = {k: v for k, v in metrics.items() if k in TIMINGS}
        return Outgoing([WIRE_NAME], [masked], PLACEHOLDER_EXAMPLES, kept)

    def after_push(self, outcome: str) -> None:
        """Reveal this client's shares for the survivors (once they are published)."""
        if outcome != Push.OK:
            return
        try:
            self.exchange.reveal()
        except SecAggError as exc:
            log.warning("%s round %d: no shares revealed: %s", self.client_id, self.round_no, exc)
