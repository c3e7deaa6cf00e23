"""The aggregator's side of a round: from the survivors' masked sum and the revealed shares to the plain sum.

For every survivor it rebuilds the self-mask seed (checked against the survivor's commitment);
for every client that shared but sent no masked input and has a surviving neighbour, it rebuilds
the mask private key (checked by deriving its public key) and from it the pairwise seeds with
those neighbours. Shares from outside an owner's neighbourhood, or of the wrong kind, are never
used. Anything short of a verified seed for every mask in the sum raises ``SecAggError``: the
round fails with a reason, it never commits a wrong sum.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedq.errors import SecAggError
from fedq.protocol.secagg import agreement, shamir
from fedq.protocol.secagg.graph import holder_index, neighbours
from fedq.protocol.secagg.masking import remove_masks
from fedq.protocol.secagg.params import SecAggParams
from fedq.protocol.secagg.participant import MASK_KEY, SELF_MASK, Advert

Reveals = Mapping[str, Mapping[str, tuple[str, bytes]]]  # holder -> owner -> (kind, share)


@dataclass(frozen=True)
class RoundRecord:
    """What the aggregator knows publicly about a round once the share stage closed."""

    run_id: str
    round_no: int
    params: SecAggParams
    roster: Mapping[str, Advert]  # who advertised keys: the graph's vertices
    graph_seed: bytes
    commitments: Mapping[str, bytes]  # the sharers: each one's commitment to its self-mask seed

    def graph(self) -> dict[str, frozenset[str]]:
        """Everyone's neighbours, as every client computed them."""
        return neighbours(sorted(self.roster), self.params.neighbours, self.graph_seed)


@dataclass
class Unmasked:
    """The plain sum and which holders revealed shares that are off their owner's polynomial."""

    total: np.ndarray
    survivors: int
    bad_holders: dict[str, list[str]] = field(default_factory=dict)  # owner -> holders


def _shares_for(owner: str, kind: str, group: frozenset[str], reveals: Reveals,
                xs: Mapping[str, int]) -> dict[int, bytes]:
    out = {}
    for holder in sorted(group & set(reveals)):
        got = reveals[holder].get(owner)
        if got is not None and got[0] == kind:
            out[xs[holder]] = got[1]
    return out


def _recover(record: RoundRecord, owner: str, kind: str, group: frozenset[str], reveals: Reveals,
             xs: Mapping[str, int], result: Unmasked) -> bytes:
    if kind == SELF_MASK:
        want = record.commitments[owner]

        def verify(secret: bytes) -> bool:
            return agreement.commit(secret, record.run_id, record.round_no, owner) == want
        what = f"{owner}'s self-mask seed"
    else:
        public = record.roster[owner].mask_public

        def verify(secret: bytes) -> bool:
            return agreement.public_key(secret) == public
        what = f"{owner}'s mask key"
    got = shamir.recover(_shares_for(owner, kind, group, reveals, xs), record.params.reconstruction_threshold,
                         verify, what)
    if got.bad_holders:
        names = {x: c for c, x in xs.items()}
        result.bad_holders[owner] = [names[x] for x in got.bad_holders]
    return got.secret


def unmask(record: RoundRecord, masked_sum: np.ndarray, survivors: Collection[str], reveals: Reveals) -> Unmasked:
    """The survivors' plain uint32 sum from their masked sum and the shares revealed to the aggregator."""
    alive = set(survivors)
    t = record.params.reconstruction_threshold
    if not alive <= set(record.commitments):
        raise SecAggError("bad_survivors", f"survivors that never shared: {sorted(alive - set(record.commitments))}")
    if len(alive) < t:
        raise SecAggError("too_few_survivors", f"{len(alive)} clients sent masked inputs, {t} needed")
    graph, xs = record.graph(), holder_index(list(record.roster))
    reveals = {h: r for h, r in reveals.items() if h in alive}  # only clients that sent an input reveal
    result = Unmasked(masked_sum, len(alive))
    self_seeds = [_recover(record, u, SELF_MASK, graph[u] | {u}, reveals, xs, result) for u in sorted(alive)]
    dangling = []
    for d in sorted(set(record.commitments) - alive):
        linked = sorted(graph[d] & alive)
        if not linked:
            continue  # its masks are in no survivor's input
        key = _recover(record, d, MASK_KEY, graph[d] | {d}, reveals, xs, result)
        for u in linked:
            seed = agreement.agree(key, record.roster[u].mask_public, "mask", record.run_id, record.round_no, d, u)
            dangling.append((u, d, seed))
    result.total = remove_masks(masked_sum, self_seeds, dangling)
    return result
