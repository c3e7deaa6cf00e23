"""One client's side of a secure-aggregation round, as pure steps.

1. ``advertise``: two fresh public keys (mask, channel).
2. ``share``: given everyone's keys, pick the neighbourhood, draw the self-mask seed ``b``,
   Shamir-share ``b`` and the mask private key among the neighbourhood (keeping one share of
   each), seal each neighbour's shares to it, and commit to ``b``.
3. ``masked``: the masked input, against the neighbours that completed step 2.
4. ``reveal``: given the survivors (who sent a masked input), open the bundles the neighbours
   sealed to this client and reveal, per neighbour, the share of ``b`` if it survived, else the
   share of its mask key -- never both for one client, and only once per round.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import msgpack
import numpy as np

from fedq.errors import SecAggError
from fedq.protocol.secagg import agreement, shamir
from fedq.protocol.secagg.graph import holder_index, neighbours
from fedq.protocol.secagg.masking import mask_input
from fedq.protocol.secagg.params import SecAggParams

SELF_MASK = "b"  # the kind of share revealed for a survivor
MASK_KEY = "sk"  # the kind of share revealed for a dropped client


@dataclass(frozen=True)
class Advert:
    """A client's public keys for one round."""

    mask_public: bytes
    channel_public: bytes


def bundle_aad(run_id: str, round_no: int, owner: str, holder: str) -> bytes:
    """What a sealed share bundle is bound to: a bundle moved to another holder or round does not open."""
    return agreement.context("bundle", run_id, round_no, owner, holder)


@dataclass
class Participant:
    """A client's secrets and view for one round (lives only in the client's memory)."""

    run_id: str
    round_no: int
    me: str
    params: SecAggParams
    mask_keys: agreement.KeyPair = field(default_factory=agreement.KeyPair.generate)
    channel_keys: agreement.KeyPair = field(default_factory=agreement.KeyPair.generate)
    self_seed: bytes = field(default_factory=lambda: os.urandom(32))
    roster: dict[str, Advert] = field(default_factory=dict)
    peers: frozenset[str] = frozenset()
    own_shares: tuple[bytes, bytes] = (b"", b"")
    revealed: bool = False

    def advertise(self) -> Advert:
        """Step 1: this round's public keys."""
        return Advert(self.mask_keys.public, self.channel_keys.public)

    def share(self, roster: Mapping[str, Advert], graph_seed: bytes) -> tuple[bytes, dict[str, bytes]]:
        """Step 2: the commitment to the self-mask seed and a sealed bundle per neighbour."""
        if roster.get(self.me) != self.advertise():
            raise SecAggError("bad_roster", f"the roster does not hold {self.me}'s own keys")
        self.params.check(len(roster))
        self.roster = dict(roster)
        self.peers = neighbours(sorted(roster), self.params.neighbours, graph_seed)[self.me]
        xs = holder_index(list(roster))
        group = sorted(self.peers | {self.me})
        holders = [xs[c] for c in group]
        t = self.params.reconstruction_threshold
        b_shares = shamir.split(self.self_seed, holders, t)
        k_shares = shamir.split(self.mask_keys.private, holders, t)
        bundles = {}
        for peer in sorted(self.peers):
            plain = msgpack.packb([b_shares[xs[peer]], k_shares[xs[peer]]], use_bin_type=True)
            aad = bundle_aad(self.run_id, self.round_no, self.me, peer)
            bundles[peer] = agreement.seal(self._channel(peer), plain, aad)
        self.own_shares = (b_shares[xs[self.me]], k_shares[xs[self.me]])
        return agreement.commit(self.self_seed, self.run_id, self.round_no, self.me), bundles

    def _channel(self, peer: str) -> bytes:
        return agreement.agree(self.channel_keys.private, self.roster[peer].channel_public, "channel",
                               self.run_id, self.round_no, self.me, peer)

    def masked(self, x: np.ndarray, sharers: Collection[str]) -> np.ndarray:
        """Step 3: ``x`` masked; pairwise masks with the neighbours among ``sharers`` (who completed step 2)."""
        if self.me not in sharers:
            raise SecAggError("bad_roster", f"{self.me} is not among the clients that shared")
        seeds = {
            peer: agreement.agree(self.mask_keys.private, self.roster[peer].mask_public, "mask",
                                  self.run_id, self.round_no, self.me, peer)
            for peer in sorted(self.peers & set(sharers))
        }
        return mask_input(x, self.me, self.self_seed, seeds)

    def reveal(self, survivors: Collection[str], sharers: Collection[str],
               inbox: Mapping[str, bytes]) -> dict[str, tuple[str, bytes]]:
        """Step 4: per neighbourhood member (this client included), the one share the aggregator may see."""
        if self.revealed:
            raise SecAggError("already_revealed", f"{self.me} already revealed its shares this round")
        alive, shared = set(survivors), set(sharers)
        if not alive <= shared or self.me not in alive:
            raise SecAggError("bad_survivors", "the survivors are not a subset of the sharers holding this client")
        if len(alive) < self.params.reconstruction_threshold:
            raise SecAggError("too_few_survivors",
                              f"{len(alive)} survivors, {self.params.reconstruction_threshold} needed to reveal")
        self.revealed = True
        out = {self.me: (SELF_MASK, self.own_shares[0])}
        for owner in sorted(self.peers & shared):
            sealed = inbox.get(owner)
            if sealed is None:
                continue
            aad = bundle_aad(self.run_id, self.round_no, owner, self.me)
            plain = agreement.open_sealed(self._channel(owner), sealed, aad, f"shares from {owner}")
            b_share, k_share = _unpack_bundle(plain, owner)
            out[owner] = (SELF_MASK, b_share) if owner in alive else (MASK_KEY, k_share)
        return out


def _unpack_bundle(plain: bytes, owner: str) -> tuple[bytes, bytes]:
    try:
        pair = msgpack.unpackb(plain, raw=False)
    except Exception:
        raise SecAggError("bad_bundle", f"shares from {owner} do not decode") from None
    if (not isinstance(pair, list) or len(pair) != 2
            or not all(isinstance(s, bytes) and len(s) == shamir.SHARE_BYTES for s in pair)):
        raise SecAggError("bad_bundle", f"shares from {owner} are not two {shamir.SHARE_BYTES}-byte shares")
    return pair[0], pair[1]
