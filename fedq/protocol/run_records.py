"""One run's keys and what any role reads of them: the base of the run's store (fedq.protocol.store).

RunRecords holds the connection, the run's key names and its Lua steps (registered on first
use); its methods create a run and read its spec, state, members, records, payloads, refusals,
push logs and events. Small records are JSON so that ``redis-cli`` and the dashboard can read
them. Every blocking call here takes an explicit timeout.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, Protocol

import redis
from redis.commands.core import Script

from fedq.errors import ConfigError, RunNotFound
from fedq.protocol import guarded, keys
from fedq.protocol.audit import AuditTrail
from fedq.protocol.replies import (
    as_bytes,
    json_list,
    json_object,
    opt_text,
    raise_any,
    refusal,
    stream_order,
    text,
    text_fields,
    valid_client_id,
    xread_entries,
)
from fedq.protocol.vocabulary import Event, Phase, Status

MAX_REFUSED = 10_000  # refusal log is capped so a flood of bad pushes cannot fill Redis
MAX_EVENTS = 10_000
MAX_PUSHES = 100_000
EVENTS_PER_READ = 100  # run events one wait for them hands back at most
KERAS_MAGIC = b"PK\x03\x04"  # a .keras file is a zip archive
MAX_STRING = 512 * 1024 * 1024  # Redis's own cap on one string value


class SpecRecord(Protocol):
    """What the store needs of a run spec (fedq.learning.spec.RunSpec): its counts and its record."""

    rounds: int
    clients: int

    def to_dict(self) -> dict[str, Any]: ...


class RunRecords:
    """Reads one run's keys (and creates the run)."""

    def __init__(self, r: redis.Redis, run_id: str) -> None:
        self.r = r
        self.run_id = run_id
        self.k = keys.RunKeys(run_id)
        self.driver: str | None = None  # set by acquire_lease; fences this store's writes
        self._scripts: dict[str, Script] = {}
        self.audit = AuditTrail(self.k.judged, MAX_PUSHES)  # judgements waiting to ride with the next call

    def _script(self, source: str) -> Script:
        """One of fedq.protocol.scripts, registered with this connection on first use."""
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.r.register_script(source)
        return script

    def _call(self, source: str, keys: list[Any], args: list[Any]) -> Any:
        """Run one of fedq.protocol.scripts on this run's keys."""
        return self._script(source)(keys=keys, args=args)

    def _staged_call(self, source: str, staged: str, payload: bytes, keys: list[Any], args: list[Any]) -> Any:
        """SET payload under the key staged and run a script that moves it (RENAME) or drops it,
        in one MULTI: a model or an update never passes through Lua (scripts.py). The script's
        reply. A script Redis has not loaded yet is loaded and the SET sent again with it, in
        one MULTI (_with_script): the bytes it moves are the caller's own, never those another
        writer of the key (a deposed driver, a second process of the client) put there in between."""
        def set_then_run(pipe: Any, sha: str) -> None:
            pipe.set(staged, payload)
            pipe.evalsha(sha, len(keys), *keys, *args)

        stored, reply = self._with_script(source, set_then_run, atomic=True)
        raise_any([stored, reply])
        return reply

    def _after_audit(self, source: str, steps: Callable[[Any, str], None], atomic: bool = False) -> list[Any]:
        """Send in one pipeline, after the audit entries waiting (audit.py), the commands
        steps(pipe, sha) queues (_with_script); their replies, in order. When Redis has not
        loaded the script, the audit entries went with the first send, not again."""
        return self._with_script(source, steps, atomic, before=self.audit.into)

    def _with_script(self, source: str, steps: Callable[[Any, str], None], atomic: bool = False,
                     before: Callable[[Any], None] | None = None) -> list[Any]:
        """Send in one pipeline the commands steps(pipe, sha) queues: runs of the script source
        by its sha (EVALSHA directly: a pipeline running a Script object asks SCRIPT EXISTS
        first, a trip more) and the commands that go with them; their replies, in order (those
        of before(pipe)'s commands, queued first, are only checked for errors). atomic: in one
        MULTI, so that nothing runs between them. When Redis has not loaded the script (a first
        call, a restart, SCRIPT FLUSH), no run of it ran: it is loaded and the same commands are
        sent again, together, in a pipeline of the same kind (before is called again: it queues
        only what is still to send). The other commands run twice then, so they must change
        nothing the script has not put in place (reads, a move of what it moved, a SET the
        retry sends again with the script); not atomic, steps may queue one run only (of two,
        another connection's load could come between them)."""
        for _attempt in range(2):
            pipe = self.r.pipeline(transaction=atomic)
            if before is not None:
                before(pipe)
            first = len(pipe)
            steps(pipe, self._script(source).sha)
            replies = pipe.execute(raise_on_error=False)
            raise_any(replies[:first])
            if not any(isinstance(x, redis.exceptions.NoScriptError) for x in replies[first:]):
                return replies[first:]
            self.r.script_load(source)
        raise redis.exceptions.NoScriptError("a script could not be loaded")

    def create(self, spec: SpecRecord, queue: str = "") -> None:
        """Store a new run's spec and queued state; ConfigError if the id is taken."""
        now = time.time()
        if not self.r.set(self.k.spec, json.dumps(spec.to_dict()), nx=True):
            raise ConfigError(f"run {self.run_id} already exists")
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.k.state, mapping={"status": Status.QUEUED, "phase": Phase.JOIN, "round": 0,
                                         "rounds": spec.rounds, "clients": spec.clients,
                                         "queue": queue, "created_at": now, "updated_at": now})
        pipe.zadd(keys.RUNS, {self.run_id: now})
        pipe.xadd(self.k.events, {"event": Event.CREATED}, maxlen=MAX_EVENTS, approximate=True)
        pipe.execute()
        self.r.xadd(keys.EVENTS, {"event": Event.CREATED, "run": self.run_id}, maxlen=MAX_EVENTS, approximate=True)

    def exists(self) -> bool:
        return bool(self.r.exists(self.k.spec))

    def spec_record(self) -> dict[str, Any]:
        """The run's spec as stored (fedq.learning.spec.load_spec makes it a RunSpec);
        RunNotFound when there is no such run."""
        raw = self.r.get(self.k.spec)
        if raw is None:
            raise RunNotFound(f"no run {self.run_id!r} in Redis")
        record = json_object(raw)
        if record is None:
            raise RunNotFound(f"run {self.run_id!r} has no readable spec in Redis")
        return record

    def state(self) -> dict[str, str]:
        """The state hash as str -> str (empty when the run does not exist)."""
        return text_fields(self.r.hgetall(self.k.state))

    def state_and_global(self) -> tuple[dict[str, str], bytes | None]:
        """The state hash and the global model's payload (or head), as one commit left them:
        one round trip (MULTI/EXEC), for a client that expects to train next."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hgetall(self.k.state)
        pipe.get(self.k.global_model)
        state, payload = pipe.execute()
        return text_fields(state), as_bytes(payload)

    def committed_round(self) -> int:
        return int(opt_text(self.r.hget(self.k.state, "round")) or 0)

    def member_ids(self) -> list[str]:
        """Ids of the clients that joined, sorted (ids that are no valid client id are skipped)."""
        return sorted(cid for cid in map(text, self.r.smembers(self.k.members)) if valid_client_id(cid))

    def _joined_field(self, field: str, ids: list[str] | None = None) -> dict[str, dict[str, Any]]:
        ids = self.member_ids() if ids is None else ids
        # The join hash is the client's own key: any type or size; a bad one reads as absent.
        values = guarded.hash_fields(self.r, [self.k.joined(cid) for cid in ids], [field])
        decoded = {cid: json_object(v[0]) for cid, v in zip(ids, values)}
        return {cid: rec for cid, rec in decoded.items() if rec is not None}

    def clients(self, ids: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """Client id -> join record (shard, host, pid, rows) of every client that joined (of
        those of ids that did, when given); a record that cannot be read is left out."""
        return self._joined_field("record", ids)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Client id -> feature statistics of every client that joined."""
        return self._joined_field("stats")

    def num_clients(self) -> int:
        return int(self.r.scard(self.k.members))

    def metrics(self) -> list[dict[str, Any]]:
        return [json.loads(m) for m in self.r.lrange(self.k.metrics, 0, -1)]

    def last_metrics(self) -> dict[str, Any] | None:
        """The newest committed round's record."""
        raw = self.r.lindex(self.k.metrics, -1)
        return None if raw is None else json.loads(raw)

    def _client_keys(self, kind: str, limit: int = 10_000) -> list[str]:
        """Per-client keys of one kind in this run, found by SCAN (not the member set: a client
        that never joined can still have been refused); names that are not exactly
        fedq:{run}:c:<valid id>:<kind> are skipped."""
        found: set[str] = set()
        for key in self.r.scan_iter(match=self.k.client_keys_pattern(kind), count=1000):
            name = opt_text(key) or ""
            cid = self.k.client_of(name)
            if valid_client_id(cid) and name == f"{self.k.client_base(cid)}:{kind}":
                found.add(name)
                if len(found) >= limit:
                    break
        return sorted(found)

    def refused(self) -> list[dict[str, Any]]:
        """Every refusal, oldest first: those at the door (each client's own list, read
        defensively: any type, size or content) and those of the aggregator."""
        own = guarded.lists(self.r, [self.k.refused], last=MAX_REFUSED)
        theirs = guarded.lists(self.r, self._client_keys("refused"), last=1000)
        records = [refusal(rec) for raws in [*own, *theirs] for rec in json_list(raws)]
        return sorted((rec for rec in records if rec is not None), key=lambda rec: rec["time"])

    def global_payload(self) -> bytes | None:
        return as_bytes(self.r.get(self.k.global_model))

    def initial_payload(self) -> bytes | None:
        """The initial global model its submitter stored with the run (keys.RunKeys.initial), if any."""
        return as_bytes(self.r.get(self.k.initial))

    def set_initial(self, payload: bytes) -> None:
        """Store the run's initial global model, before the run is enqueued (submitters only)."""
        self.r.set(self.k.initial, payload)

    def drop_initial(self) -> None:
        """Forget the submitted initial model once it is committed (the global model holds it now)."""
        self.r.delete(self.k.initial)

    def scaler_payload(self) -> bytes | None:
        return as_bytes(self.r.get(self.k.scaler))

    def model_file(self) -> bytes | None:
        """The final model's .keras file as the aggregator stored it (within its
        FEDQ_MAX_MODEL_FILE_BYTES); None when there is none, or the key holds something else
        (another type, not a zip archive)."""
        (raw,) = guarded.strings(self.r, [self.k.model_file], cap=MAX_STRING)
        if raw is not None and not raw.startswith(KERAS_MAGIC):
            guarded.warn_once(self.k.model_file, "not a .keras file (a zip archive)")
            return None
        return raw

    def server_state_payload(self) -> bytes | None:
        """The strategy's server state saved with the last commit (None: none saved)."""
        return as_bytes(self.r.get(self.k.server_state))

    def selected(self, round_no: int) -> set[str] | None:
        """Clients chosen to train in the round; None when the round does not sample clients."""
        members = self.r.smembers(self.k.selected(round_no))
        return {text(m) for m in members} if members else None

    def is_selected(self, round_no: int, client_id: str) -> bool:
        """Whether client_id is chosen for a sampled round (False once the round's set is gone)."""
        return bool(self.r.sismember(self.k.selected(round_no), client_id))

    def evals(self) -> dict[str, bytes]:
        """Client id -> stored evaluation payload (final-evaluation phase); a key of another
        type or over the record cap reads as absent."""
        ids = self.member_ids()
        values = guarded.strings(self.r, [self.k.evaluation(cid) for cid in ids])
        return {cid: v for cid, v in zip(ids, values) if v is not None}

    def consumed(self, round_no: int) -> dict[str, str]:
        """Client id -> sequence number of its update for the round that a committed version folded."""
        return text_fields(self.r.hgetall(self.k.consumed(round_no)))

    def version_payload(self, version: int) -> bytes | None:
        """The kept copy of a model version (buffered aggregation), or None."""
        return as_bytes(self.r.get(self.k.version_model(version)))

    def pushes(self) -> list[dict[str, str]]:
        """The push log of every client, oldest first: written by the clients themselves (their
        view of what they sent), so read defensively and never used to audit the run."""
        entries = [(stream_order(eid), text_fields(fields))
                   for reply in guarded.streams(self.r, self._client_keys("pushes")) for eid, fields in reply]
        return [fields for _order, fields in sorted(entries, key=lambda e: e[0])]

    def judged(self) -> list[dict[str, str]]:
        """The aggregator's record of every update version it judged (client, round, seq,
        digest, outcome, bytes), oldest first: the run's audit trail, out of the clients' reach."""
        self.audit.flush(self.r)
        return [text_fields(fields) for _eid, fields in self.r.xrange(self.k.judged) or []]

    def events(self, count: int = MAX_EVENTS) -> list[tuple[float, dict[str, str]]]:
        """The run's event stream, oldest first (up to count entries): (the entry's time, from its
        id, in seconds since the epoch; its fields)."""
        return [(stream_order(eid)[0] / 1000.0, text_fields(fields))
                for eid, fields in self.r.xrange(self.k.events, count=count) or []]

    def last_event_id(self) -> str:
        """Id of the newest entry in the run's event stream ('0-0' when empty)."""
        entries = self.r.xrevrange(self.k.events, count=1)
        return text(entries[0][0]) if entries else "0-0"

    def wait_event(self, last_id: str, block_seconds: float) -> tuple[str, list[dict[str, str]]]:
        """Block up to block_seconds for run events after last_id; returns (new last id, events)."""
        last, entries = self.events_after(last_id, block_seconds)
        return last, [fields for _id, fields in entries]

    def events_after(self, last_id: str, block_seconds: float,
                     count: int = EVENTS_PER_READ) -> tuple[str, list[tuple[str, dict[str, str]]]]:
        """Block up to block_seconds for at most count run events after last_id; returns (new
        last id, (id, fields) of each event)."""
        reply = self.r.xread({self.k.events: last_id}, block=max(1, int(block_seconds * 1000)), count=count)
        entries = xread_entries(reply)
        return (entries[-1][0] if entries else last_id), entries
