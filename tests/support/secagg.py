"""A secure-aggregation round in memory: real keys, shares and masks, no Redis (``SecAggRound``)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np

from fedq.protocol.secagg.masking import add_into
from fedq.protocol.secagg.params import SecAggParams
from fedq.protocol.secagg.participant import Participant
from fedq.protocol.secagg.unmasking import Reveals, RoundRecord, Unmasked, unmask


@dataclass
class SecAggRound:
    """Clients c00..c{n-1} through the four stages; ``run`` drops whom it is told to at each stage."""

    n: int
    params: SecAggParams
    run_id: str = "run-1"
    round_no: int = 3
    graph_seed: bytes = b"graph-seed"
    clients: dict[str, Participant] = field(init=False)
    masked: dict[str, np.ndarray] = field(default_factory=dict)
    reveals: dict[str, dict[str, tuple[str, bytes]]] = field(default_factory=dict)
    record: RoundRecord | None = None
    size: int = 0

    def __post_init__(self) -> None:
        ids = [f"c{i:02d}" for i in range(self.n)]
        self.clients = {c: Participant(self.run_id, self.round_no, c, self.params) for c in ids}

    def run(self, inputs: dict[str, np.ndarray], *, drop_before_share: Collection[str] = (),
            drop_before_input: Collection[str] = (), drop_before_reveal: Collection[str] = ()) -> Unmasked:
        """Every stage in order; returns the aggregator's unmasked result (or raises its SecAggError)."""
        self.size = next(iter(inputs.values())).size
        roster = {c: p.advertise() for c, p in self.clients.items()}
        commitments, inboxes = {}, {c: {} for c in self.clients}
        for c, p in self.clients.items():
            if c in drop_before_share:
                continue
            commitments[c], bundles = p.share(roster, self.graph_seed)
            for peer, sealed in bundles.items():
                inboxes[peer][c] = sealed
        self.record = RoundRecord(self.run_id, self.round_no, self.params, roster, self.graph_seed, commitments)
        sharers = set(commitments)
        for c in sorted(sharers - set(drop_before_input)):
            self.masked[c] = self.clients[c].masked(inputs[c], sharers)
        survivors = set(self.masked)
        for c in sorted(survivors - set(drop_before_reveal)):
            self.reveals[c] = self.clients[c].reveal(survivors, sharers, inboxes[c])
        return self.unmask(survivors, self.reveals)

    def unmask(self, survivors: Collection[str], reveals: Reveals) -> Unmasked:
        """The aggregator's step over what was sent (callable again with altered reveals)."""
        assert self.record is not None
        total = np.zeros(self.size, dtype=np.uint32)
        for c in sorted(survivors):
            add_into(total, self.masked[c])
        return unmask(self.record, total, survivors, reveals)
