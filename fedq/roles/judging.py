"""Judging and folding a round's updates: read each version once, check it, fold it, refuse with a reason.

``Judging`` is the part of the aggregator that deals with what clients pushed (fedq.roles.aggregator
drives the rounds around it). Every value it reads was written by an untrusted client: the Redis
guard (fedq.protocol.scripts.READ_UPDATE) checks type, sequence number and size before anything
travels, each version is judged once, and every judgement lands in the audit trail.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from fedq.errors import UpdateRejected
from fedq.learning.aggregate import capped_weights
from fedq.learning.spec import RunSpec
from fedq.learning.strategies import Strategy
from fedq.protocol import chunking, codec, messages, transfer
from fedq.protocol.signing import Verifier
from fedq.protocol.store import RunStore
from fedq.protocol.update_reads import StoredUpdate
from fedq.protocol.vocabulary import Read, Refusal
from fedq.roles import metrics as fedq_metrics
from fedq.settings import Settings

log = logging.getLogger("fedq.roles.aggregator")

# Updates of small models are read many to a round trip (Judging._read_ahead): at most this many
# clients' at once, each read that way only up to this many bytes (a larger one is read again on
# its own, as every update of a larger model is), so that a batch holds at most 8 MiB.
READ_AHEAD = 128
READ_AHEAD_BYTES = 64 * 1024
# A payload this small is hashed on the spot: handing it to the helper thread and back costs
# two thread switches, each a wait for a CPU on a loaded machine, for microseconds of hashing.
HASH_INLINE_BYTES = 64 * 1024


@dataclass
class Round:
    """What one round has folded and refused so far (small: digests and counts, not models)."""

    acc: Strategy  # streaming for the FedAvg family (memory one model); robust ones hold N
    joined: dict[str, int | None]  # client id -> rows it joined with (None: not reported)
    base: list[np.ndarray] = field(default_factory=list)  # the global model the round trains from
    compression: str = "none"  # the run's encoding of updates (fedq.protocol.compress)
    selected: set[str] | None = None  # the clients chosen to train (None: every joined client)
    folded: dict[str, messages.Update] = field(default_factory=dict)
    refused: set[str] = field(default_factory=set)
    # client id -> version of its update last judged: its push sequence number, or a marker of
    # what was wrong with its key, so that each version is judged (and read) exactly once.
    versions: dict[str, str] = field(default_factory=dict)
    reads: dict[str, int] = field(default_factory=dict)  # client id -> versions read this round
    weights: dict[str, int] = field(default_factory=dict)  # client id -> capped weight (--max-client-share)
    template: list[messages.TensorSpec] = field(default_factory=list)  # the model's tensors
    gone: set[str] = field(default_factory=set)  # members due an update whose heartbeat expired
    settled: bool = False  # the last liveness check found nobody left to wait for
    checked_alive: float = 0.0  # time.monotonic() of that check
    recorded: set[tuple[str, str]] = field(default_factory=set)  # (client, version) in the audit trail
    fold_seconds: float = 0.0
    last_arrival: float = 0.0
    part_keys: set[str] = field(default_factory=set)  # parts of updates judged: deleted at commit
    members: list[str] | None = None  # the run's members as the round's close saw them
    # Reads made ahead of judging (Judging._read_ahead): client id -> (judged, what was found),
    # used by the client's next read if it asks the same (judged, any version), else dropped.
    ahead: dict[str, tuple[str, StoredUpdate]] = field(default_factory=dict)
    # A mode's own admission check (buffered: staleness, updates folded already): raises
    # UpdateRejected for a client whose update the round must not take.
    gate: Callable[[str], None] | None = None

    @property
    def responded(self) -> int:
        return len(self.folded) + len(self.refused)

    def expected(self, spec: RunSpec) -> int:
        return spec.clients if self.selected is None else len(self.selected)


class Judging:
    """The aggregator's judgement of updates (mixed into fedq.roles.aggregator.Aggregator)."""

    run_id: str
    settings: Settings
    store: RunStore
    verifier: Verifier | None

    if TYPE_CHECKING:  # the Aggregator's, used here
        # Renew the lease and honour stop requests between long steps.
        def _tick(self) -> None: ...

    def _cap_shares(self, spec: RunSpec, rnd: Round, round_no: int, template: list[messages.TensorSpec]) -> None:
        """--max-client-share: lower the weight of any update that would carry more than the
        share of the mean, then rebuild the sum with those weights (only when one binds)."""
        if spec.max_client_share is None:
            return
        counts = {cid: upd.num_examples for cid, upd in rnd.folded.items()}
        weights = capped_weights(counts, spec.max_client_share)
        if weights == counts:
            return
        log.warning("run %s round %d: capping the weight of %s at a share of %g", self.run_id, round_no,
                    ", ".join(sorted(c for c in counts if weights[c] != counts[c])), spec.max_client_share)
        rnd.weights = weights
        self._refold(rnd, round_no, template)

    def _judge(self, rnd: Round, round_no: int, cid: str, template: list[messages.TensorSpec],
               observe: bool = True, folded: str | None = None,
               take: Callable[[messages.Update], None] | None = None) -> messages.Update | None:
        """Judge a client's current update, as stages: read (checked in Redis) -> check (the
        key, membership, selection) -> decode and validate -> verify the signature -> take
        (the caller's fold, given as take) -> record the judgement. The payload's digest
        (BLAKE3) is hashed on a helper thread meanwhile (it lets go of the interpreter's lock),
        so on a second core it costs the round nothing. Returns the update (its digest in), or None
        when there was nothing new or it was refused."""
        got = self._read(rnd, round_no, cid, observe, folded)
        if got is None:
            return None
        payload = got.payload or b""
        hashed = _digest(payload)
        try:
            self._admissible(rnd, round_no, cid, got)
            upd = messages.validate_update(payload, run_id=self.run_id, round_no=round_no, client_id=cid,
                                           template=template, max_examples=self._max_examples(rnd, cid),
                                           compression=rnd.compression, base=rnd.base, digest="")
            self._verify(round_no, upd, template)
        except UpdateRejected as exc:
            if observe:
                fedq_metrics.observe_update(False, exc.reason, len(payload))
            self._record_judged(rnd, round_no, cid, rnd.versions[cid], got.seq,
                                hashed.result() if payload else "", exc.reason, len(payload))
            self._refuse(rnd, round_no, cid, exc)
            if rnd.folded.pop(cid, None) is not None:
                self._refold(rnd, round_no, template)  # its earlier, valid version no longer counts
            return None
        if observe:
            fedq_metrics.observe_update(True, None, len(payload))
        if take is not None:
            take(upd)
        upd = replace(upd, digest=hashed.result())
        held = rnd.folded.get(cid)
        if held is not None and not held.digest:  # what take kept of it: with its digest
            rnd.folded[cid] = replace(held, digest=upd.digest)
        self._record_judged(rnd, round_no, cid, rnd.versions[cid], got.seq, upd.digest, "accepted", len(payload))
        return upd

    def _read(self, rnd: Round, round_no: int, cid: str, observe: bool,
              folded: str | None = None) -> StoredUpdate | None:
        """Stage read: the client's update if it is a version not judged yet (None otherwise).
        Each version is read once: Redis checks the key's type, sequence number and size before
        anything travels, and a version already judged costs a few bytes whatever wakes us.

        A rebuild (observe False) re-reads what was judged (folded: the version folded before),
        which is not the client's doing; a newer version it finds counts like any other. At the
        cap a rebuild may read the folded version only, and Redis checks that in the read itself
        (a push landing in between is refused unread), so that re-pushing during rebuilds cannot
        get past max_pushes_per_round either: reads only ever counts up to the cap."""
        judged = rnd.versions.get(cid, "")
        capped = rnd.reads.get(cid, 0) >= self.settings.max_pushes_per_round
        if capped and observe:
            self._too_many_pushes(rnd, round_no, cid, judged)
            return None
        since, only = _since(judged), ((folded or "-") if capped else "")
        ahead = rnd.ahead.pop(cid, None)
        if ahead is not None and ahead[0] == since and not only:
            got = ahead[1]  # read a moment ago, as this read would have been
        else:
            got = self.store.read_update(round_no, cid, since, self.settings.max_update_bytes, only=only)
        if got.kind == Read.CAPPED:
            self._too_many_pushes(rnd, round_no, cid, judged or folded or "")
            return None
        if got.kind in (Read.NONE, Read.SEEN):
            return None
        version = got.version  # its sequence number, or what is wrong with the key
        if version == judged:
            return None  # the same bad key as before: recorded once already
        rnd.versions[cid] = version
        if observe or version != folded:
            rnd.reads[cid] = rnd.reads.get(cid, 0) + 1
        return got

    def _read_ahead(self, rnd: Round, round_no: int, ids: list[str], template: list[messages.TensorSpec]) -> None:
        """Read the updates of ids (clients about to be judged, in that order) in one round trip
        where the model is small, for _read to take instead of reading each on its own. Each is
        read as _read would read it next (a client at its cap is not read: _read refuses it
        unread). Judging is unchanged: each version is still judged once, by _read's checks."""
        rnd.ahead.clear()
        if chunking.model_bytes(template) > READ_AHEAD_BYTES // 2:
            return  # most would come back too large for a batch: one trip each, as before
        asks = [(cid, _since(rnd.versions.get(cid, ""))) for cid in ids
                if rnd.reads.get(cid, 0) < self.settings.max_pushes_per_round]
        if len(asks) < 2:
            return
        cap = min(self.settings.max_update_bytes, READ_AHEAD_BYTES)
        got = self.store.read_updates(round_no, asks, cap)
        for cid, judged in asks:
            found = got.get(cid)
            if found is None or (found.kind == Read.TOO_LARGE and found.size <= self.settings.max_update_bytes):
                continue  # too large for a batch but not for the run: nothing moved; _read reads it alone
            rnd.ahead[cid] = (judged, found)

    def _consider_all(self, rnd: Round, round_no: int, ids: list[str], template: list[messages.TensorSpec],
                      before: Callable[[str], None] | None = None) -> None:
        """_consider each of ids in order (before(cid) first, when given), their updates read
        READ_AHEAD at a time (_read_ahead) rather than one round trip each."""
        for at in range(0, len(ids), READ_AHEAD):
            batch = ids[at:at + READ_AHEAD]
            self._read_ahead(rnd, round_no, [c for c in batch if c in rnd.joined], template)
            for cid in batch:
                if before is not None:
                    before(cid)
                self._consider(rnd, round_no, cid, template)
            rnd.ahead.clear()  # what nobody took (a client refused unread meanwhile) is not kept

    def _admissible(self, rnd: Round, round_no: int, cid: str, got: StoredUpdate) -> None:
        """Stage check: UpdateRejected unless the key was sound and the client is due an update."""
        if got.kind != Read.OK:
            raise UpdateRejected(*_key_problem(got, self.settings.max_update_bytes))
        if cid not in rnd.joined:
            raise UpdateRejected(Refusal.UNKNOWN_CLIENT, f"client {cid!r} has not joined run {self.run_id}")
        if rnd.selected is not None and cid not in rnd.selected:
            raise UpdateRejected(Refusal.NOT_SELECTED, f"client {cid!r} is not among those chosen for round {round_no}")
        if rnd.gate is not None:
            rnd.gate(cid)

    def _verify(self, round_no: int, upd: messages.Update, template: list[messages.TensorSpec]) -> None:
        """Stage verify: with a client registry, UpdateRejected unless the signature holds. It
        covers what travelled: a compressed update's codes, scales and encoding; an update in
        parts, the digests of its parts."""
        if self.verifier is None:
            return
        digest = None if upd.layout is None else messages.parts_digest(
            upd.names or [], [t.shape for t in template], upd.layout)
        self.verifier.verify(self.run_id, round_no, upd.client_id, upd.num_examples, upd.wire_names or upd.names or [],
                             upd.tensors if upd.wire_tensors is None else upd.wire_tensors, upd.signature,
                             upd.compression, digest)

    def _record_judged(self, rnd: Round, round_no: int, cid: str, version: str, seq: str, digest: str,
                       outcome: str, nbytes: int) -> None:
        """One line of the audit trail per version judged (a rebuild's re-reading adds none)."""
        if (cid, version) in rnd.recorded:
            return
        rnd.recorded.add((cid, version))
        self.store.record_judged(cid, round_no, seq, digest, outcome, nbytes)

    def _max_examples(self, rnd: Round, cid: str) -> int | None:
        """The most samples cid may claim: the rows it joined with (its own claim) and, when the
        operator provisioned one, its limit in the client registry, whichever is lower."""
        limits = [n for n in (rnd.joined.get(cid), self.verifier and self.verifier.max_examples(cid))
                  if isinstance(n, int)]
        return min(limits) if limits else None

    def _too_many_pushes(self, rnd: Round, round_no: int, cid: str, judged: str) -> None:
        """Past max_pushes_per_round a client's newer versions are refused unread (once), and
        any version of it already folded leaves the round."""
        seq = self.store.update_seq(round_no, cid)
        if not seq or seq == judged or judged.startswith("!too_many_pushes"):
            return
        rnd.versions[cid] = "!too_many_pushes"
        exc = UpdateRejected(Refusal.TOO_MANY_PUSHES, f"more than {self.settings.max_pushes_per_round} versions "
                             f"pushed for round {round_no} (FEDQ_MAX_PUSHES_PER_ROUND)")
        self.store.record_judged(cid, round_no, seq, "", exc.reason, 0)
        self._refuse(rnd, round_no, cid, exc)
        if rnd.folded.pop(cid, None) is not None:
            self._refold(rnd, round_no, rnd.template)

    def _refuse(self, rnd: Round, round_no: int, cid: str, exc: UpdateRejected) -> None:
        """Log and record a refused update; it counts as a response when the client was due one."""
        log.warning("run %s round %d: refused update from %s: %s", self.run_id, round_no, cid, exc)
        self.store.record_refused(cid, round_no, exc.reason, exc.detail)
        if cid in rnd.joined and (rnd.selected is None or cid in rnd.selected):
            rnd.refused.add(cid)

    def _consider(self, rnd: Round, round_no: int, cid: str, template: list[messages.TensorSpec]) -> None:
        """Validate and fold one client's stored update, once per version."""
        self._tick()  # a rescan folds many updates in a row: keep the lease through them
        t0 = time.perf_counter()

        def take(upd: messages.Update) -> None:  # while its digest is hashed
            rnd.refused.discard(cid)
            replaced = cid in rnd.folded
            rnd.folded[cid] = _strip(upd)  # keep metadata only: memory stays one model, not N
            if replaced:
                self._refold(rnd, round_no, template)  # a re-push replaces: rebuild without the old one
            elif not self._fold(rnd, round_no, upd, template):
                self._refold(rnd, round_no, template)  # a bad part: take out what it added
            rnd.last_arrival = time.time()

        self._judge(rnd, round_no, cid, template, take=take)
        rnd.fold_seconds += time.perf_counter() - t0

    def _refold(self, rnd: Round, round_no: int, template: list[messages.TensorSpec]) -> None:
        """Recompute the running sum from the current stored updates of the folded clients."""
        clean = False
        while not clean:  # a part that fails mid-rebuild leaves some of it behind: start over
            rnd.acc.reset()
            clean = True
            for cid in list(rnd.folded):
                self._tick()
                # Out of folded and versions first: judge the current version afresh, and a
                # refusal here must not start another rebuild.
                del rnd.folded[cid]
                was = rnd.versions.pop(cid, None)
                upd = self._judge(rnd, round_no, cid, template, observe=False, folded=was)
                if upd is not None:
                    rnd.folded[cid] = _strip(upd)
                    if not self._fold(rnd, round_no, upd, template):
                        clean = False
                        break

    def _fold(self, rnd: Round, round_no: int, upd: messages.Update, template: list[messages.TensorSpec]) -> bool:
        """Add an accepted update to the round's sum: whole, or part by part as its parts are
        read (memory: one part). False when a part was missing or bad: the update is then
        refused (unless a newer push replaced it meanwhile), and the sum holds some of it, so
        the caller rebuilds."""
        weight = rnd.weights.get(upd.client_id, upd.num_examples)
        if upd.layout is None:
            rnd.acc.add(upd.tensors, weight, upd.client_id)
            return True
        rnd.part_keys.update(transfer.update_part_keys(self.store, upd))
        try:
            if rnd.acc.streams_parts:
                def fold(offset: int, values: np.ndarray) -> None:
                    self._tick()  # a model of a GB is many parts and seconds: renew as we go
                    rnd.acc.add_part(offset, values, weight)

                transfer.fold_parts(self.store, upd, fold)
                rnd.acc.count_update(weight, upd.client_id)
            else:
                rnd.acc.add(transfer.assemble(self.store, upd, template, on_part=self._tick), weight,
                            upd.client_id)
            return True
        except UpdateRejected as exc:
            cid = upd.client_id
            rnd.folded.pop(cid, None)
            # not superseded: this version itself is bad
            if rnd.versions.get(cid) == self.store.update_seq(round_no, cid):
                fedq_metrics.observe_update(False, exc.reason, 0)
                self._refuse(rnd, round_no, cid, exc)
            else:
                rnd.versions.pop(cid, None)  # judge the newer push when its wake-up comes
            return False


_HASHER: ThreadPoolExecutor | None = None


def _since(judged: str) -> str:
    """What a read sends as the version already judged: its sequence number, or "" when what
    was judged is a marker of a bad key (any version is then new)."""
    return judged if judged.isdigit() else ""


def _digest(payload: bytes) -> Future[str]:
    """The payload's digest (codec.digest), hashed on the helper thread (done on the spot when it is small)."""
    if len(payload) > HASH_INLINE_BYTES:
        return _hasher().submit(codec.digest, payload)
    done: Future[str] = Future()
    done.set_result(codec.digest(payload))
    return done


def _hasher() -> ThreadPoolExecutor:
    """The helper thread that hashes payloads while the aggregator folds (one: digests of one
    round's updates come in the order they were read)."""
    global _HASHER
    if _HASHER is None:
        _HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedq-digest")
    return _HASHER


def _key_problem(got: StoredUpdate, max_bytes: int) -> tuple[str, str]:
    """The refusal (reason, detail) for an update key that failed the checks made in Redis."""
    if got.kind == Read.TOO_LARGE:
        return Refusal.TOO_LARGE, f"{got.size} bytes exceeds the cap of {max_bytes} (FEDQ_MAX_UPDATE_BYTES)"
    if got.kind == Read.WRONG_TYPE:
        return Refusal.MALFORMED, f"the update key holds a Redis {got.seq}, not a hash"
    if got.kind == Read.BAD_SEQ:
        return Refusal.MALFORMED, f"the update's sequence number {got.seq!r} is not a whole number"
    if got.kind == Read.BAD_PARTS:
        return Refusal.MALFORMED, "the update's push id is not one fedq writes"
    if got.kind == Read.NO_BODY:
        return Refusal.MALFORMED, f"version {got.seq} of the update has no bytes (missing, or not a string)"
    return Refusal.MALFORMED, f"the update key could not be read ({got.kind})"


def _strip(upd: messages.Update) -> messages.Update:
    return replace(upd, tensors=[], names=None, wire_names=None, wire_tensors=None, signature=None)
