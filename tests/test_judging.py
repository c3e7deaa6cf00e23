"""The cap on versions read per client and round (FEDQ_MAX_PUSHES_PER_ROUND) holds by construction.

Judging is driven step by step against a real Redis, and a client's push is made to land exactly
where a loaded aggregator may meet it: between whatever the aggregator looked at and its read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import redis

from fedq.learning.strategies import Strategy, StrategySpec
from fedq.protocol import messages
from fedq.protocol.store import RunStore
from fedq.protocol.update_reads import StoredUpdate
from fedq.roles.judging import Judging, Round
from fedq.settings import Settings

RUN = "t-judging"
CID = "m"
CAP = 4
GLOBAL = [np.zeros((3, 2), np.float32), np.zeros(2, np.float32)]
NAMES = ["w", "b"]


class _Spec:
    """What RunStore.create needs of a run spec."""

    rounds, clients = 1, 1

    def to_dict(self) -> dict[str, Any]:
        return {"rounds": 1, "clients": 1}


class _Store(RunStore):
    """A RunStore whose read_update, when armed, first runs the step given (a client's push):
    it then lands after anything the aggregator looked at, and before its read."""

    before_read: Callable[[], None] | None = None

    def read_update(self, round_no: int, client_id: str, judged: str, max_bytes: int,
                    only: str = "") -> StoredUpdate:
        step, self.before_read = self.before_read, None
        if step is not None:
            step()
        return super().read_update(round_no, client_id, judged, max_bytes, only)


class _Judge(Judging):
    def __init__(self, store: RunStore) -> None:
        self.run_id, self.store, self.verifier = RUN, store, None
        self.settings = Settings.from_env(env={}, max_pushes_per_round=CAP)

    def _tick(self) -> None:
        pass


def _setup(r: redis.Redis) -> tuple[RunStore, _Judge, Round]:
    """A run in training with one member (CID) and the aggregator's judging of round 1."""
    store = _Store(r, RUN)
    store.create(_Spec())
    assert store.acquire_lease("driver", 30)
    assert store.join(CID, {"shard": 0}, {"count": [1]}) == "requested" and store.admit(CID)
    assert store.open_training(b"scaler", messages.encode_global(RUN, 0, NAMES, GLOBAL))
    acc = Strategy(StrategySpec(), GLOBAL)
    acc.begin_round(GLOBAL)
    template = messages.template_of(NAMES, GLOBAL)
    return store, _Judge(store), Round(acc=acc, joined={CID: None}, base=GLOBAL, template=template)


def _push(client: RunStore, version: int) -> None:
    tensors = [t + version for t in GLOBAL]
    payload = messages.encode_update(RUN, 1, CID, 10, {"loss": 0.1}, NAMES, tensors)
    assert client.push_update(CID, 1, payload, 1 << 20) == "ok"


def test_a_push_landing_before_a_rebuilds_read_at_the_cap_is_refused_unread(r: redis.Redis) -> None:
    store, judge, rnd = _setup(r)
    client = RunStore(r, RUN)
    for version in range(1, CAP + 1):  # each version read replaces the last and rebuilds the sum
        _push(client, version)
        judge._consider(rnd, 1, CID, rnd.template)
    assert rnd.reads[CID] == CAP and CID in rnd.folded
    judge._refold(rnd, 1, rnd.template)  # at the cap, a rebuild still re-reads the version folded
    assert rnd.reads[CID] == CAP and CID in rnd.folded and CID not in rnd.refused

    store.before_read = lambda: _push(client, CAP + 1)  # lands after any look, before the read
    judge._refold(rnd, 1, rnd.template)
    judge._consider(rnd, 1, CID, rnd.template)  # the wake-up of that push: nothing more to read
    assert rnd.reads[CID] == CAP
    assert CID not in rnd.folded and CID in rnd.refused
    mine = [j for j in store.judged() if j["client"] == CID]
    assert [(j["seq"], j["outcome"]) for j in mine if int(j["bytes"]) > 0] == [
        (str(v), "accepted") for v in range(1, CAP + 1)]
    assert [(j["seq"], j["outcome"], j["bytes"]) for j in mine if int(j["bytes"]) == 0] == [
        (str(CAP + 1), "too_many_pushes", "0")]
