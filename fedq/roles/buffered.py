"""The buffered driver (``--aggregation buffered``, FedBuff): model versions instead of rounds.

Clients train from the newest version and push when done, each update tagged with the version it
started from (round r = base version + 1, as in rounds, so an update's key, envelope and signature
are a round's). The driver keeps one Round per base version still inside the staleness window
(fedq.roles.judging judges and folds into it exactly as in rounds: each version of a client's key
read once, a re-push for the same base replacing its earlier one), and after buffer_size accepted
updates commits the next version: the staleness-weighted step of fedq.learning.staleness, then the
run's server step (FedAvgM, FedAdam, ...), in one fenced Lua step (scripts.COMMIT_VERSION) that also
marks every folded update consumed. A driver taking over mid-buffer rebuilds the buffer from Redis:
the updates still stored and not consumed are exactly the ones no committed version holds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedq.errors import CodecError, ConfigError, UpdateRejected
from fedq.learning import staleness
from fedq.learning.aggregate import weighted_metrics
from fedq.learning.spec import RunSpec
from fedq.protocol import chunking, messages, transfer
from fedq.protocol.fencing import VersionCommit
from fedq.protocol.store import RunStore
from fedq.protocol.vocabulary import Phase, Refusal
from fedq.roles import metrics as fedq_metrics
from fedq.roles.judging import Round
from fedq.settings import Settings

log = logging.getLogger("fedq.roles.aggregator")


@dataclass
class Window:
    """The versions updates may still be trained from, and what each has folded since the last commit."""

    version: int  # the last committed version
    limit: int  # --max-staleness
    rounds: dict[int, Round] = field(default_factory=dict)  # round r (trained from version r - 1)
    bases: dict[int, list[np.ndarray]] = field(default_factory=dict)  # version -> its model
    consumed: dict[int, dict[str, str]] = field(default_factory=dict)  # round -> client -> seq committed

    @property
    def count(self) -> int:
        """Updates in the buffer (one per client and base version: a re-push replaces)."""
        return sum(len(rnd.folded) for rnd in self.rounds.values())

    def staleness(self, round_no: int) -> int:
        """How many versions behind the newest an update for round_no is."""
        return self.version + 1 - round_no

    def span(self) -> range:
        """The rounds judged now: those whose updates may be folded, and the one just behind
        them, whose updates (pushed around the door, or judged after a commit overtook them) are
        refused as stale and recorded; older ones the push step refuses."""
        return range(max(1, self.version - self.limit), self.version + 2)


class Buffering:
    """The buffered driver (mixed into fedq.roles.aggregator.Aggregator beside Judging)."""

    run_id: str
    settings: Settings
    store: RunStore

    if TYPE_CHECKING:  # the Aggregator's (and its other mixins'), used here
        def _tick(self) -> None: ...
        def _check_exists(self) -> None: ...
        def _joined(self) -> dict[str, int | None]: ...
        def _admit_late(self, spec: RunSpec, rnd: Round, cid: str) -> None: ...
        def _consider(self, rnd: Round, round_no: int, cid: str, template: list[messages.TensorSpec]) -> None: ...
        def _evaluate(self, drive: Any, weights: list[np.ndarray] | None) -> tuple[dict[str, Any], float]: ...
        def _model_file(self, drive: Any) -> bytes | None: ...
        def _wait_quorum(self, spec: RunSpec, what: str, have: Any, on_idle: Any, on_wake: Any,
                         expected: int | None = None, quorum: int | None = None, settled: Any = None) -> None: ...

    # --- driving ---------------------------------------------------------------------------------
    def _drive_versions(self, drive: Any) -> None:
        """Commit versions until the run's last: fill the buffer, then commit (drive: _Driving)."""
        spec = drive.spec
        if chunking.should_chunk(drive.template, self.settings.chunk_bytes):
            raise ConfigError(f"--aggregation buffered keeps the model versions updates train from whole in "
                              f"Redis, and this model travels in parts (over FEDQ_CHUNK_BYTES = "
                              f"{self.settings.chunk_bytes}); use --aggregation sync")
        if drive.global_tensors is None:  # lean drives keep none; versions' deltas need it
            drive.global_tensors = transfer.read_global(self.store)[2]
        win = self._open_window(drive)
        log.info("run %s: buffered aggregation from version %d: %d updates per version, staleness up to %d (%s)",
                 self.run_id, win.version, spec.buffer_k, win.limit, spec.staleness_kind)
        while drive.round_no < spec.rounds:
            self._fill(drive, win)
            self._commit_version(drive, win)

    def _open_window(self, drive: Any) -> Window:
        """The window as the last commit left it: the kept model versions, and per round the
        updates committed versions folded already (a resumed driver folds only the others)."""
        version = drive.round_no
        payload = self.store.global_payload()
        if payload is None:
            raise CodecError(f"run {self.run_id} has no global model to resume from")
        self.store.keep_version(version, payload)
        win = Window(version=version, limit=drive.spec.staleness_limit, bases={version: drive.global_tensors})
        for r in win.span():
            self._add_round(drive, win, r)
        return win

    def _base(self, win: Window, version: int) -> list[np.ndarray]:
        if version not in win.bases:
            payload = self.store.version_payload(version)
            if payload is None:
                raise CodecError(f"run {self.run_id}: model version {version} is missing from Redis")
            win.bases[version] = messages.decode_global(payload, self.run_id)[2]
        return win.bases[version]

    def _add_round(self, drive: Any, win: Window, r: int) -> None:
        """Open round r (updates trained from version r - 1) in the window."""
        base = self._base(win, r - 1)
        acc = staleness.version_accumulator(drive.spec.strategy, base)
        acc.begin_round(base)
        consumed = win.consumed.setdefault(r, self.store.consumed(r))
        rnd = Round(acc=acc, joined=self._joined(), base=base, compression=drive.spec.compression,
                    template=drive.template)
        rnd.gate = lambda cid: self._gate(win, r, cid)
        if drive.spec.keep_updates:  # a consumed update kept for audit was judged already
            current = self.store.update_seqs(r, sorted(consumed))
            rnd.versions.update({cid: seq for cid, seq in consumed.items() if current.get(cid) == seq})
        # (Otherwise the commit deleted it: whatever is stored under a consumed client's key is a
        # later write, judged and refused.)
        win.rounds[r] = rnd

    def _gate(self, win: Window, r: int, cid: str) -> None:
        """Buffered admission: refuse an update too stale, or one already in a committed version."""
        tau = win.staleness(r)
        if tau > win.limit:
            raise UpdateRejected(Refusal.STALE, f"trained from version {r - 1}, {tau} versions behind "
                                                f"{win.version} (--max-staleness {win.limit})")
        if cid in win.consumed.get(r, {}):
            raise UpdateRejected(Refusal.ALREADY_FOLDED, f"client {cid!r}'s update trained from version {r - 1} "
                                                         f"is in a committed version already")

    def _fill(self, drive: Any, win: Window) -> None:
        """Judge and fold what clients push until the buffer holds buffer_size updates. Updates
        beyond those stay stored, unread, for the next version (wake-ups come in batches)."""
        spec, template = drive.spec, drive.template
        k: int = spec.buffer_k

        def full() -> bool:
            return win.count >= k

        def admit(cid: str) -> None:
            newest = win.rounds[win.version + 1]
            self._admit_late(spec, newest, cid)
            for rnd in win.rounds.values():
                rnd.joined = newest.joined

        def rescan() -> None:
            self._check_exists()
            joined = self._joined()
            for rnd in win.rounds.values():
                rnd.joined = joined
            if len(joined) < spec.clients:
                for cid in self.store.join_requests():
                    if cid not in joined:
                        admit(cid)
            for r, rnd in sorted(win.rounds.items()):
                for cid, seq in self.store.update_seqs(r).items():
                    if rnd.versions.get(cid) != seq and not full():
                        self._consider(rnd, r, cid, template)

        def woken(cid: str) -> None:
            if cid not in win.rounds[win.version + 1].joined and len(win.rounds[win.version + 1].joined) < spec.clients:
                admit(cid)
            for r, rnd in sorted(win.rounds.items()):
                if not full():
                    self._consider(rnd, r, cid, template)

        rescan()
        self._wait_quorum(spec, f"version {win.version + 1}", lambda: win.count, rescan, woken,
                          expected=spec.buffer_k, quorum=spec.buffer_k)

    def _commit_version(self, drive: Any, win: Window) -> None:
        """The next version: staleness-weighted proposal -> server step -> evaluate -> record ->
        one fenced commit; then the window moves on."""
        spec, new = drive.spec, win.version + 1
        contributions = [staleness.Contribution(rnd.acc.result(), rnd.base, rnd.acc.total_examples, win.staleness(r))
                         for r, rnd in sorted(win.rounds.items()) if rnd.folded]
        proposal = staleness.buffered_proposal(drive.global_tensors, contributions, spec.staleness_kind)
        weights = drive.strategy.step(drive.global_tensors, proposal)
        payload, _ = transfer.encode_global(self.store, new, [t.name for t in drive.template], weights,
                                            self.settings.chunk_bytes, on_part=self._tick)
        test, eval_seconds = self._evaluate(drive, weights)
        metrics = version_record(win, new, test, eval_seconds, drive.round_started)
        after = Phase.TRAIN if new < spec.rounds else Phase.EVAL if drive.fed_eval else Phase.DONE
        folded = {(cid, r): rnd.versions[cid] for r, rnd in win.rounds.items() for cid in rnd.folded}
        gone = new - win.limit - 1  # the round leaving the window with this commit
        drop = [self.store.k.consumed(gone), self.store.k.version_model(gone - 1)] if gone >= 1 else []
        model_file = self._model_file(drive) if new == spec.rounds else None  # (its model holds weights now)
        self._tick()
        committed = self.store.commit_version(VersionCommit(
            version=new, global_payload=payload, metrics=metrics, folded=folded, after=after,
            final={"round": new, **{k: v for k, v in metrics.items() if k.startswith("test_")}},
            keep_updates=spec.keep_updates, server_state=drive.strategy.state_bytes(new), drop=drop,
            model_file=model_file))
        if not committed:
            raise CodecError(f"run {self.run_id}: version {new} could not be committed on top of {win.version}")
        fedq_metrics.observe_round(metrics["seconds"])
        fedq_metrics.observe_staleness([u["staleness"] for u in metrics["updates"]])
        log.info("run %s version %d/%d: %d updates (staleness mean %.2f, max %d), test accuracy %s", self.run_id,
                 new, spec.rounds, metrics["num_updates"], metrics["staleness_mean"], metrics["staleness_max"],
                 "-" if "accuracy" not in test else f"{test['accuracy']:.4f}")
        drive.round_no, drive.global_tensors, drive.round_started = new, weights, time.time()
        if new < spec.rounds:
            self._advance(drive, win, folded, weights)

    def _advance(self, drive: Any, win: Window, folded: dict[tuple[str, int], str],
                 weights: list[np.ndarray]) -> None:
        """Move the window to the version just committed: the folded updates are consumed, a
        round opens for the new version, and the round leaving the window is judged one last time
        (its leftovers refused as stale) and dropped."""
        for (cid, r), seq in folded.items():
            win.consumed.setdefault(r, {})[cid] = seq
            if not drive.spec.keep_updates:  # the commit deleted it: a key there now is a later write
                win.rounds[r].versions.pop(cid, None)  # (its numbering starts again: seq 1 is new)
                win.rounds[r].recorded.discard((cid, seq))
        for rnd in win.rounds.values():
            rnd.folded.clear()
            rnd.refused.clear()
            rnd.acc.reset()
        win.version += 1
        win.bases[win.version] = weights
        self._add_round(drive, win, win.version + 1)
        for r in [r for r in win.rounds if r not in win.span()]:
            rnd = win.rounds.pop(r)
            for cid, seq in self.store.update_seqs(r).items():
                if rnd.versions.get(cid) != seq:
                    self._consider(rnd, r, cid, drive.template)
            if not drive.spec.keep_updates:
                self.store.drop_parts(self.store.k.update(cid, r) for cid in self.store.member_ids())
            win.consumed.pop(r, None)
        for v in [v for v in win.bases if v < win.version - win.limit - 1]:
            del win.bases[v]


def version_record(win: Window, version: int, test: dict[str, Any], eval_seconds: float,
                   started: float) -> dict[str, Any]:
    """A version's record (fedq:{run}:metrics; report.json's rounds): its updates, their
    staleness and clients, and the central evaluation of the new model."""
    updates = [(win.staleness(r), upd) for r, rnd in sorted(win.rounds.items()) for upd in rnd.folded.values()]
    taus = [tau for tau, _ in updates]
    train = weighted_metrics((u.metrics, u.num_examples) for _, u in updates)
    seconds = time.time() - started
    return {
        "round": version,
        "version": version,
        "num_updates": len(updates),
        "num_examples": sum(u.num_examples for _, u in updates),
        "train_loss": train.get("loss"),
        "train_accuracy": train.get("accuracy"),
        "test_loss": test.get("loss"),
        "test_accuracy": test.get("accuracy"),
        **{f"test_{k}": v for k, v in test.items() if k not in ("loss", "accuracy")},
        "seconds": seconds,
        "overhead_seconds": None,  # updates overlap training: no one client's training to subtract
        "eval_seconds": eval_seconds,
        "staleness_mean": sum(taus) / len(taus),
        "staleness_max": max(taus),
        "updates": [{"client": u.client_id, "base": version - 1 - tau, "staleness": tau,
                     "num_examples": u.num_examples, "digest": u.digest} for tau, u in updates],
        "clients": per_client(updates),
    }


def per_client(updates: list[tuple[int, Any]]) -> dict[str, dict[str, Any]]:
    """A version's clients: one entry each, even for a client with updates from two base versions
    (one folded stale, one fresh): its sample counts summed, its freshest update's staleness,
    digest and metrics, and how many updates it gave (the full list is the record's updates)."""
    out: dict[str, dict[str, Any]] = {}
    for tau, u in sorted(updates, key=lambda x: -x[0]):  # the freshest last: its fields win
        prev = out.get(u.client_id)
        out[u.client_id] = {"num_examples": u.num_examples + (prev["num_examples"] if prev else 0),
                            "staleness": tau, "digest": u.digest, "updates": 1 + (prev["updates"] if prev else 0),
                            **u.metrics}
    return out
