"""Redis operations of the round protocol: one class per run, atomic steps as Lua scripts.

Tensors travel as codec envelopes; small records (spec, state, metrics, refusals,
client records) are JSON so that ``redis-cli`` and the dashboard can read them.
Every blocking call here takes an explicit timeout.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis
from redis._parsers import Encoder
from redis.backoff import ExponentialBackoff
from redis.connection import PythonRespSerializer
from redis.retry import Retry

from fedq.errors import ConfigError, FedqError, RedisUnavailable, RunNotFound
from fedq.protocol import guarded, keys, scripts
from fedq.protocol.audit import AuditTrail
from fedq.protocol.vocabulary import ENDED, Event, Join, Phase, Read, Status
from fedq.settings import Settings

MAX_REFUSED = 10_000  # refusal log is capped so a flood of bad pushes cannot fill Redis
MAX_EVENTS = 10_000
MAX_PUSHES = 100_000
DRAIN_BATCH = 10_000  # inbox entries drained per call
KERAS_MAGIC = b"PK\x03\x04"  # a .keras file is a zip archive
MAX_STRING = 512 * 1024 * 1024  # Redis's own cap on one string value
JOIN_BATCH = 100  # waiting join requests taken per call


class LeaseLost(FedqError):
    """This aggregator no longer holds the run's lease; another one drives it now."""


def tls_options(settings: Settings) -> dict[str, Any]:
    """redis-py's TLS arguments for a rediss:// URL: verify the server, present our certificate."""
    if not settings.redis_url.startswith("rediss://"):
        return {}
    opts: dict[str, Any] = {"ssl_cert_reqs": "required"}
    if settings.tls_ca_cert:
        opts["ssl_ca_certs"] = settings.tls_ca_cert
    if settings.tls_cert:
        opts.update(ssl_certfile=settings.tls_cert, ssl_keyfile=settings.tls_key)
    return opts


# Replies are parsed by hiredis (C), but commands are packed by redis-py's own packer, which
# sends a large value as it is: hiredis' packer copies it into one buffer first, which took
# 10 ms of CPU for a 4 MB update where this takes 1 ms.
_PACKER = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)


def _client(settings: Settings, retries: int) -> redis.Redis:
    try:
        return redis.Redis.from_url(
            settings.redis_url,
            command_packer=_PACKER,
            socket_timeout=settings.socket_timeout,
            socket_connect_timeout=settings.connect_timeout,
            health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=3.0, base=0.1), retries=retries),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            **tls_options(settings),
        )
    except ValueError as exc:
        raise ConfigError(f"bad Redis URL {redact(settings.redis_url)!r}: {exc}") from None


def connect(settings: Settings, check: bool = True) -> redis.Redis:
    """A Redis client for settings.redis_url with timeouts and reconnect backoff.

    The returned client rides out a Redis restart (reconnect_retries with backoff); the
    start-up check does not, so that a wrong URL is reported in seconds."""
    client = _client(settings, settings.reconnect_retries)
    if check:
        probe = _client(settings, retries=3)
        try:
            probe.ping()
        except redis.RedisError as exc:
            raise RedisUnavailable(f"cannot reach Redis at {redact(settings.redis_url)}: {exc}") from None
        finally:
            probe.close()
    return client


def redact(url: str) -> str:
    """The URL with any password replaced, for messages and logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def _s(raw: bytes | str | None) -> str | None:
    # Keys and fields may have been written around the protocol: never let bad bytes crash a loop.
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw


def _str(raw: bytes | str | None) -> str:
    """A key, field, member or entry id as text ('' for none: redis-py types them `bytes | str | None`)."""
    return _s(raw) or ""


def _fields(raw: Mapping[bytes | str, bytes | str] | None) -> dict[str, str]:
    """A hash's or a stream entry's fields as text ({} for none)."""
    return {_str(k): _str(v) for k, v in (raw or {}).items()}


def as_bytes(raw: bytes | str | None) -> bytes | None:
    """A binary value (a model, a scaler): fedq's connections leave replies undecoded (redis-py's
    default), so it is bytes; redis-py's type also covers clients made with decode_responses."""
    if isinstance(raw, str):
        raise TypeError("Redis returned a binary value as text: connect without decode_responses")
    return raw


def _xread_entries(reply: list[list[Any]] | Mapping[Any, Any] | None) -> list[tuple[str, dict[str, str]]]:
    """(id, fields) of every entry of an XREAD reply, oldest first. fedq's connections speak RESP2
    (redis-py's default): [[stream, [(id, fields), ...]], ...], or nothing when the block timed out;
    redis-py's type also covers RESP3's mapping."""
    if isinstance(reply, Mapping):
        raise TypeError("XREAD replied in RESP3's shape: fedq connects with RESP2 (protocol=2)")
    return [(_str(entry_id), _fields(fields)) for _stream, entries in reply or [] for entry_id, fields in entries]


def _json_object(raw: bytes | str | None) -> dict[str, Any] | None:
    """A JSON object, or None for anything else (absent, not JSON, not an object)."""
    if raw is None:
        return None
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def _json_list(raws: list[bytes]) -> list[dict[str, Any]]:
    """Decode a list of JSON records, skipping any that are not JSON objects."""
    return [rec for rec in map(_json_object, raws) if rec is not None]


def _refusal(rec: dict[str, Any]) -> dict[str, Any] | None:
    """A refusal record with the fields readers use, of the types they expect (a client's own
    list may hold anything); None when it is not one."""
    try:
        when = float(rec.get("time") or 0)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(when):
        return None
    return {**rec, "time": when, "client": str(rec.get("client", ""))[:64], "reason": str(rec.get("reason", ""))[:64],
            "detail": str(rec.get("detail", ""))[:500]}


def valid_client_id(client_id: str | None) -> bool:
    """Whether client_id is a valid key component (ids in shared structures may be anything)."""
    try:
        keys.check_client_id(client_id or "")
    except ConfigError:
        return False
    return True


@dataclass(frozen=True)
class StoredUpdate:
    """What RunStore.read_update found: kind is ok, none, seen, or what is wrong with the key."""

    kind: Read
    seq: str = ""
    payload: bytes | None = None
    parts: str = ""
    size: int = 0

    @property
    def version(self) -> str:
        """The version this is (see version_marker)."""
        return version_marker(self.kind, self.seq)


def version_marker(kind: Read, seq: str) -> str:
    """What names one version of a client's stored update, so that each is judged once: its push
    sequence number whenever the key carries a valid one (whatever else is wrong with it), else a
    marker naming what is wrong with the key. RunStore.update_seqs (a cheap look) and the update
    guard (a read) name a version alike, so a rescan finds nothing new in a version judged."""
    if kind == Read.WRONG_TYPE:
        return "!wrong_type"
    if kind == Read.BAD_SEQ:
        return "!bad_seq:" + seq[:32]
    return seq


@dataclass(frozen=True)
class Commit:
    """One round's commit, by name: RunStore.commit_round writes it all in one atomic step."""

    round: int
    global_payload: bytes  # the next global model (or the head of its parts, written before)
    metrics: dict[str, Any]  # the round's record
    after: Phase = Phase.TRAIN  # TRAIN: the next round opens; EVAL: final evaluation; DONE: the run ends
    final: dict[str, Any] | None = None  # the run's final record (with DONE)
    keep_updates: bool = False  # keep the round's updates (and their parts) for audit
    server_state: bytes | None = None  # the strategy's server optimiser state after this round
    next_selected: list[str] | None = None  # the clients chosen for the next round (sampled runs)
    previous_metrics: dict[str, Any] | None = None  # the previous round's record, now with its federated evaluation
    update_parts: Sequence[str] = ()  # parts of the round's updates sent in parts (deleted with them)
    stale_parts: Sequence[str] = ()  # global-model parts no head refers to any more (always deleted)
    model_file: bytes | None = None  # the final model as a .keras file (with the last round's commit)
    members: Sequence[str] | None = None  # the run's members, as the close looked at them (None: read them)


@dataclass(frozen=True)
class VersionCommit:
    """One buffered version's commit, by name: RunStore.commit_version writes it in one step."""

    version: int
    global_payload: bytes  # the new version's model (whole: buffered runs keep versions whole)
    metrics: dict[str, Any]  # the version's record
    folded: Mapping[tuple[str, int], str]  # (client, round) -> sequence number of each update folded
    after: Phase = Phase.TRAIN
    final: dict[str, Any] | None = None
    keep_updates: bool = False
    server_state: bytes | None = None
    drop: Sequence[str] = ()  # keys out of the staleness window: old model copies, consumed hashes


def _raise_any(replies: list[Any]) -> None:
    """Raise the first error among pipelined replies (the audit entries that rode along)."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply


def _version_of(reply: Any) -> str:
    """The version marker of an update from its 'seq' field as HGET replied (an error: the key
    is of another type)."""
    if isinstance(reply, Exception):
        return version_marker(Read.WRONG_TYPE, "")
    text = _s(reply) or ""
    return version_marker(Read.OK if text.isdigit() and len(text) <= 15 else Read.BAD_SEQ, text)


def _stream_order(entry_id: bytes | str | None) -> tuple[int, int]:
    ms, _, seq = (_s(entry_id) or "0-0").partition("-")
    return int(ms), int(seq or 0)


class SpecRecord(Protocol):
    """What the store needs of a run spec (fedq.learning.spec.RunSpec): its counts and its record."""

    rounds: int
    clients: int

    def to_dict(self) -> dict[str, Any]: ...


class RunStore:
    """Reads and writes one run's keys."""

    def __init__(self, r: redis.Redis, run_id: str) -> None:
        self.r = r
        self.run_id = run_id
        self.k = keys.RunKeys(run_id)
        self._join = r.register_script(scripts.JOIN)
        self._admit = r.register_script(scripts.ADMIT)
        self._read_update = r.register_script(scripts.READ_UPDATE)
        self._drain = r.register_script(scripts.DRAIN)
        self._waiting_joins = r.register_script(scripts.WAITING_JOINS)
        self._push = r.register_script(scripts.PUSH)
        self._open = r.register_script(scripts.OPEN_TRAINING)
        self._commit = r.register_script(scripts.COMMIT)
        self._commit_version = r.register_script(scripts.COMMIT_VERSION)
        self._close = r.register_script(scripts.CLOSE)
        self._renew = r.register_script(scripts.RENEW)
        self._release = r.register_script(scripts.RELEASE)
        self._fail = r.register_script(scripts.FAIL)
        self._push_eval = r.register_script(scripts.PUSH_EVAL)
        self._finish_eval = r.register_script(scripts.FINISH_EVAL)
        self.driver: str | None = None  # set by acquire_lease; fences this store's writes
        self.audit = AuditTrail(self.k.judged)  # judgements waiting to ride with the next call

    # --- creation and reading -------------------------------------------------------
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
        record = _json_object(raw)
        if record is None:
            raise RunNotFound(f"run {self.run_id!r} has no readable spec in Redis")
        return record

    def state(self) -> dict[str, str]:
        """The state hash as str -> str (empty when the run does not exist)."""
        return _fields(self.r.hgetall(self.k.state))

    def state_and_global(self) -> tuple[dict[str, str], bytes | None]:
        """The state hash and the global model's payload (or head), as one commit left them:
        one round trip (MULTI/EXEC), for a client that expects to train next."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hgetall(self.k.state)
        pipe.get(self.k.global_model)
        state, payload = pipe.execute()
        return _fields(state), as_bytes(payload)

    def committed_round(self) -> int:
        return int(_s(self.r.hget(self.k.state, "round")) or 0)

    def member_ids(self) -> list[str]:
        """Ids of the clients that joined, sorted (ids that are no valid client id are skipped)."""
        return sorted(cid for cid in map(_str, self.r.smembers(self.k.members)) if valid_client_id(cid))

    def _joined_field(self, field: str) -> dict[str, dict[str, Any]]:
        ids = self.member_ids()
        # The join hash is the client's own key: any type or size; a bad one reads as absent.
        values = guarded.hash_fields(self.r, [self.k.joined(cid) for cid in ids], [field])
        decoded = {cid: _json_object(v[0]) for cid, v in zip(ids, values)}
        return {cid: rec for cid, rec in decoded.items() if rec is not None}

    def clients(self) -> dict[str, dict[str, Any]]:
        """Client id -> join record (shard, host, pid, rows) of every client that joined."""
        return self._joined_field("record")

    def num_clients(self) -> int:
        return int(self.r.scard(self.k.members))

    def metrics(self) -> list[dict[str, Any]]:
        return [json.loads(m) for m in self.r.lrange(self.k.metrics, 0, -1)]

    def _client_keys(self, kind: str, limit: int = 10_000) -> list[str]:
        """Per-client keys of one kind in this run, found by SCAN (not the member set: a client
        that never joined can still have been refused); names that are not exactly
        fedq:{run}:c:<valid id>:<kind> are skipped."""
        found: set[str] = set()
        for key in self.r.scan_iter(match=self.k.client_keys_pattern(kind), count=1000):
            name = _s(key) or ""
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
        records = [_refusal(rec) for raws in [*own, *theirs] for rec in _json_list(raws)]
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

    # --- client side ------------------------------------------------------------------
    def join(self, client_id: str, record: dict[str, Any], stats: dict[str, Any]) -> str:
        """Ask to join with a record and feature statistics; returns requested (the aggregator
        admits: see wait_admitted), rejoined, or a refusal code."""
        named = {"client": client_id, "state": self.k.state, "members": self.k.members, "inbox": self.k.inbox,
                 "joins": self.k.joins}
        return _s(self._join(keys=[self.k.joined(client_id)],
                             args=[json.dumps(named), json.dumps(record), json.dumps(stats)])) or ""

    def wait_admitted(self, client_id: str, timeout: float, block_seconds: float = 1.0) -> str:
        """After join() answered requested: block until the aggregator admits the client
        ('joined') or refuses it (its reason), or the run ends; 'join_timeout' after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            # One look (MULTI), which also takes away any wake-up it covers: an answer given
            # after it pushes a new one. Clients wait on their own list, not on the run's
            # events: with hundreds joining at once, each admission woke every one of them.
            pipe = self.r.pipeline(transaction=True)
            pipe.sismember(self.k.members, client_id)
            pipe.hget(self.k.joined(client_id), "verdict")
            pipe.hget(self.k.state, "status")
            pipe.delete(self.k.answered(client_id))
            member, raw_verdict, raw_status, _ = pipe.execute()
            verdict, status = _s(raw_verdict), _s(raw_status)
            if member:
                return Join.JOINED
            if verdict:
                return verdict
            if status is None:
                return Join.NO_SUCH_RUN
            if status in ENDED:
                return Join.RUN_FINISHED if status == Status.FINISHED else Join.RUN_FAILED
            left = deadline - time.monotonic()
            if left <= 0:
                return Join.TIMEOUT
            # The run's end pushes no wake-up: a look every block_seconds finds it.
            self.r.blpop([self.k.answered(client_id)], timeout=max(0.01, min(block_seconds, left)))

    def join_and_wait(self, client_id: str, record: dict[str, Any], stats: dict[str, Any],
                      timeout: float = 60.0) -> str:
        """join(), then wait_admitted() when the request was filed: joined, rejoined or why not."""
        outcome = self.join(client_id, record, stats)
        return self.wait_admitted(client_id, timeout) if outcome == Join.REQUESTED else outcome

    def push_update(self, client_id: str, round_no: int, payload: bytes, max_bytes: int, part_id: str = "",
                    window: int = 0) -> str:
        """Store an update (or the head of one sent in parts, with its push id) for the open
        round; 'ok' or the refusal code (also recorded). window: how many versions behind the
        newest the round may be (buffered aggregation's max staleness; 0: the open round only)."""
        named = {"client": client_id, "round": int(round_no), "now": time.time(), "max_bytes": int(max_bytes),
                 "refused_max": MAX_REFUSED, "pushes_max": MAX_PUSHES, "digest": hashlib.sha256(payload).hexdigest(),
                 "part_id": part_id, "window": int(window), "state": self.k.state, "members": self.k.members,
                 "selected": self.k.selected(round_no), "consumed": self.k.consumed(round_no), "inbox": self.k.inbox}
        return _s(self._push(keys=[self.k.update(client_id, round_no), self.k.client_refused(client_id),
                                   self.k.client_pushes(client_id)], args=[json.dumps(named), payload])) or ""

    def refuse_push(self, client_id: str, round_no: int, reason: str, detail: str) -> str:
        """Record a push the client refused itself before sending (too large in parts)."""
        now = time.time()
        pipe = self.r.pipeline(transaction=True)
        pipe.xadd(self.k.client_pushes(client_id), {"client": client_id, "round": round_no, "digest": "",
                                                    "outcome": reason, "bytes": 0},
                  maxlen=MAX_PUSHES, approximate=True)
        pipe.rpush(self.k.client_refused(client_id), json.dumps(
            {"client": client_id, "round": round_no, "reason": reason, "detail": detail, "time": now,
             "stage": "push"}))
        pipe.ltrim(self.k.client_refused(client_id), -MAX_REFUSED, -1)
        pipe.execute()
        return reason

    def put_part(self, key: str, payload: bytes) -> None:
        """Store one part of a model sent in parts (before the head that lists it)."""
        self.r.set(key, payload)

    def drop_parts(self, part_keys: Iterable[str]) -> None:
        """Delete parts no head refers to any more."""
        batch = list(part_keys)
        for i in range(0, len(batch), 1000):
            self.r.delete(*batch[i:i + 1000])

    def part_id(self, client_id: str, round_no: int) -> str:
        """Push id of the client's stored update for the round ('' when it travelled whole)."""
        return _s(self.r.hget(self.k.update(client_id, round_no), "parts")) or ""

    def pushes(self) -> list[dict[str, str]]:
        """The push log of every client, oldest first: written by the clients themselves (their
        view of what they sent), so read defensively and never used to audit the run."""
        entries = [(_stream_order(eid), _fields(fields))
                   for reply in guarded.streams(self.r, self._client_keys("pushes")) for eid, fields in reply]
        return [fields for _order, fields in sorted(entries, key=lambda e: e[0])]

    def judged(self) -> list[dict[str, str]]:
        """The aggregator's record of every update version it judged (client, round, seq,
        digest, outcome, bytes), oldest first: the run's audit trail, out of the clients' reach."""
        self.audit.flush(self.r)
        return [_fields(fields) for _eid, fields in self.r.xrange(self.k.judged) or []]

    def record_judged(self, client_id: str, round_no: int, seq: str, digest: str, outcome: str,
                      nbytes: int) -> None:
        """Append one judgement to the audit trail (it travels with this store's next call: audit.py)."""
        self.audit.record(client_id, round_no, seq, digest, outcome, nbytes)

    def events(self, count: int = MAX_EVENTS) -> list[tuple[float, dict[str, str]]]:
        """The run's event stream, oldest first (up to count entries): (the entry's time, from its
        id, in seconds since the epoch; its fields)."""
        return [(_stream_order(eid)[0] / 1000.0, _fields(fields))
                for eid, fields in self.r.xrange(self.k.events, count=count) or []]

    def last_event_id(self) -> str:
        """Id of the newest entry in the run's event stream ('0-0' when empty)."""
        entries = self.r.xrevrange(self.k.events, count=1)
        return _str(entries[0][0]) if entries else "0-0"

    def wait_event(self, last_id: str, block_seconds: float) -> tuple[str, list[dict[str, str]]]:
        """Block up to block_seconds for run events after last_id; returns (new last id, events)."""
        reply = self.r.xread({self.k.events: last_id}, block=max(1, int(block_seconds * 1000)), count=100)
        entries = _xread_entries(reply)
        return (entries[-1][0] if entries else last_id), [fields for _id, fields in entries]

    # --- aggregator side ----------------------------------------------------------------
    def acquire_lease(self, driver: str, ttl: float) -> bool:
        """Take the run's lease if nobody holds it; this store then fences its writes with it."""
        if self.r.set(self.k.lease, driver, nx=True, px=int(ttl * 1000)):
            self.driver = driver
            return True
        return False

    def lease_holder(self) -> str | None:
        return _s(self.r.get(self.k.lease))

    def renew_lease(self, ttl: float) -> None:
        """Extend our lease; LeaseLost when another driver holds it (or nobody does)."""
        if not self._renew(keys=[self.k.lease], args=[self.driver or "", int(ttl * 1000)]):
            raise LeaseLost(f"run {self.run_id}: lease lost (now held by {self.lease_holder()!r})")

    def release_lease(self) -> bool:
        """Give the lease up so that a standby takes over at once."""
        done = bool(self._release(keys=[self.k.lease, self.k.events], args=[self.driver or "", MAX_EVENTS]))
        self.driver = None
        return done

    def mark_started(self, driver: str) -> None:
        """Running under driver; started_at is the first start only (a resume sets resumed_at)."""
        now = time.time()
        first = self.r.hsetnx(self.k.state, "started_at", now)
        self.r.hset(self.k.state, mapping={"status": Status.RUNNING, "driver": driver, "updated_at": now,
                                           **({} if first else {"resumed_at": now})})
        self.r.xadd(self.k.events, {"event": Event.STARTED, "driver": driver}, maxlen=MAX_EVENTS, approximate=True)

    def pop_inbox(self, block_seconds: float) -> list[str]:
        """The distinct client ids that woke us (in order), or [] after block_seconds.

        One round trip: BLPOP and the drain go in one pipeline (Redis runs the drain as soon as
        the BLPOP returns), so the first id and whatever queued behind it come back together;
        duplicates and entries that cannot be ids are dropped in Redis."""
        pipe = self.r.pipeline(transaction=False)
        self.audit.into(pipe)
        pipe.blpop([self.k.inbox], timeout=block_seconds)
        # evalsha directly: a pipeline running a Script object asks SCRIPT EXISTS first (a trip more)
        pipe.evalsha(self._drain.sha, 1, self.k.inbox, DRAIN_BATCH)
        replies = pipe.execute(raise_on_error=False)
        _raise_any(replies[:-2])
        item, drained = replies[-2:]
        if isinstance(item, Exception):
            raise item
        if isinstance(drained, Exception):  # the script not loaded yet (or Redis restarted): load it
            if not isinstance(drained, redis.exceptions.NoScriptError):
                raise drained
            drained = self._drain(keys=[self.k.inbox], args=[DRAIN_BATCH])
        rest = [_s(x) or "" for x in drained]  # pushed in the instant after a BLPOP that timed out, too
        if item is None:
            return rest
        first = _s(item[1]) or ""
        rest = [i for i in rest if i != first]
        return [first, *rest] if len(first) <= 64 else rest

    def join_request(self, client_id: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(record, statistics) a client filed with join(), or None when it filed none or filed
        something that is not two JSON objects within the size cap (or the id is invalid)."""
        if not valid_client_id(client_id):
            return None
        [(record, stats)] = guarded.hash_fields(self.r, [self.k.joined(client_id)], ["record", "stats"])
        rec, st = _json_object(record), _json_object(stats)
        return None if rec is None or st is None else (rec, st)

    def join_requests(self, limit: int = 10_000) -> list[str]:
        """Ids of clients with a join hash in this run (members or not), found by SCAN: a sweep
        of the whole keyspace, for a driver taking a run up (take_join_requests is the cheap look)."""
        return [self.k.client_of(key) for key in self._client_keys("join", limit)]

    def take_join_requests(self, limit: int = JOIN_BATCH) -> list[str]:
        """Ids of clients whose join request waits (at most limit, in no order), taken off the
        run's set of them: the caller judges each (join_request reads it). A client that asks
        again meanwhile is added again. Entries that are no valid client id are dropped."""
        ids = [_str(i) for i in self._waiting_joins(keys=[self.k.joins], args=[limit])]
        if ids:
            self.r.srem(self.k.joins, *ids)
        return [cid for cid in ids if valid_client_id(cid)]

    def admit(self, client_id: str) -> bool:
        """Make a client that asked to join a member (fenced by the lease when driving);
        False when the run is full (the client finds that verdict under its join key)."""
        named = {"client": client_id, "driver": self.driver or "", "events_max": MAX_EVENTS,
                 "verdict": f"{Join.RUN_FULL}: the run has all its clients"}
        done = self._admit(keys=[self.k.state, self.k.members, self.k.joined(client_id), self.k.lease, self.k.events,
                                 self.k.answered(client_id)],
                           args=[json.dumps(named)])
        if done == -1:
            raise LeaseLost(f"run {self.run_id}: lease lost while admitting {client_id}")
        return bool(done)

    def refuse_join(self, client_id: str, reason: str, detail: str) -> None:
        """Refuse a join request: recorded with the run's refusals, and the verdict written under
        the client's join key (where its wait_admitted finds it); a member is dropped."""
        self.record_refused(client_id, 0, reason, detail)
        pipe = self.r.pipeline(transaction=True)
        pipe.srem(self.k.members, client_id)
        pipe.delete(self.k.joined(client_id))
        pipe.hset(self.k.joined(client_id), "verdict", f"{reason}: {detail}"[:500])
        pipe.rpush(self.k.answered(client_id), client_id)  # wakes its wait_admitted
        pipe.execute()

    def stats(self) -> dict[str, dict[str, Any]]:
        """Client id -> feature statistics of every client that joined."""
        return self._joined_field("stats")

    def read_update(self, round_no: int, client_id: str, judged: str, max_bytes: int,
                    only: str = "") -> StoredUpdate:
        """A client's stored update for the round, checked in Redis before anything travels: its
        type, its sequence number, its size (against max_bytes); judged is the sequence number
        already judged, whose payload is then not sent again (kind 'seen'). only, when given, is
        the one sequence number that may be read: any other version is kind 'capped', unread
        (checked and read in one step, so that no push can slip in between)."""
        if not valid_client_id(client_id):
            return StoredUpdate(Read.NONE)
        reply, _ = self._after_audit(self._read_update, [self.k.update(client_id, round_no)], [judged, max_bytes, only])
        kind = Read(_s(reply[0]) or Read.NONE)
        if kind == Read.OK:
            return StoredUpdate(kind, _s(reply[1]) or "", reply[2] or None, _s(reply[3]) or "")
        if kind == Read.TOO_LARGE:
            return StoredUpdate(kind, _s(reply[1]) or "", size=int(reply[2]))
        return StoredUpdate(kind, (_s(reply[1]) or "") if len(reply) > 1 else "")

    def update_seq(self, round_no: int, client_id: str) -> str:
        """The version marker of a client's stored update (see update_seqs)."""
        return self.update_seqs(round_no, [client_id]).get(client_id, "")

    def update_seqs(self, round_no: int, ids: Sequence[str] | None = None) -> dict[str, str]:
        """Client id -> version marker of its stored update for the round: the push sequence
        number, or a marker naming what is wrong with the key (so that it is judged once)."""
        ids = self.member_ids() if ids is None else [c for c in ids if valid_client_id(c)]
        pipe = self.r.pipeline(transaction=False)
        for cid in ids:
            pipe.hget(self.k.update(cid, round_no), "seq")
        return {cid: _version_of(v) for cid, v in zip(ids, pipe.execute(raise_on_error=False)) if v is not None}

    def close_round(self, round_no: int) -> None:
        """Refuse further pushes for the round (fenced by the lease)."""
        if self._close(keys=[self.k.state, self.k.lease], args=[round_no, self.driver or ""]) == -1:
            raise LeaseLost(f"run {self.run_id}: lease lost before closing round {round_no}")

    def close_and_look(self, round_no: int, ids: Sequence[str]) -> tuple[list[str], dict[str, str]]:
        """Close the round (as close_round), then look at what was stored before the close, in one
        round trip when ids (the members as the caller knows them) are all the members: (the
        member ids, update_seqs of them)."""
        ids = [c for c in ids if valid_client_id(c)]

        def look(pipe: Any) -> None:
            pipe.smembers(self.k.members)
            for cid in ids:
                pipe.hget(self.k.update(cid, round_no), "seq")

        closed, replies = self._after_audit(self._close, [self.k.state, self.k.lease], [round_no, self.driver or ""],
                                            then=look)
        if closed == -1:
            raise LeaseLost(f"run {self.run_id}: lease lost before closing round {round_no}")
        members = sorted(cid for cid in map(_str, replies[0]) if valid_client_id(cid))
        seqs = {cid: _version_of(v) for cid, v in zip(ids, replies[1:]) if v is not None}
        seqs = {cid: v for cid, v in seqs.items() if cid in members}
        others = [cid for cid in members if cid not in ids]
        if others:  # members the caller did not know of: a second look
            seqs.update(self.update_seqs(round_no, others))
        return members, seqs

    def _after_audit(self, script: Any, keys: list[str], args: list[Any],
                     then: Any = None) -> tuple[Any, list[Any]]:
        """Run script in one pipeline after the audit entries waiting (audit.py) and before the
        commands then(pipe) adds: (the script's reply, theirs). A script Redis has not loaded
        yet is loaded and run on its own, and then's commands are sent again after it."""
        pipe = self.r.pipeline(transaction=False)
        self.audit.into(pipe)
        first = len(pipe)
        pipe.evalsha(script.sha, len(keys), *keys, *args)
        if then is not None:
            then(pipe)
        replies = pipe.execute(raise_on_error=False)
        _raise_any(replies[:first])
        reply, *rest = replies[first:]
        if isinstance(reply, redis.exceptions.NoScriptError):
            reply = script(keys=keys, args=args)
            if then is not None:
                again = self.r.pipeline(transaction=False)
                then(again)
                rest = again.execute(raise_on_error=False)
        elif isinstance(reply, Exception):
            raise reply
        return reply, rest

    def record_refused(self, client_id: str, round_no: int, reason: str, detail: str) -> None:
        rec = {"client": client_id, "round": round_no, "reason": reason, "detail": detail,
               "time": time.time(), "stage": "aggregate"}
        pipe = self.r.pipeline(transaction=True)
        pipe.rpush(self.k.refused, json.dumps(rec))
        pipe.ltrim(self.k.refused, -MAX_REFUSED, -1)
        pipe.execute()

    def open_training(self, scaler: bytes, initial_global: bytes, selected: list[str] | None = None) -> bool:
        """Write the scaler and the initial global model and open round 1, atomically
        (with round 1's chosen clients when rounds sample them)."""
        named = {"driver": self.driver or "", "now": time.time(), "events_max": MAX_EVENTS, "selected": selected}
        done = self._open(keys=[self.k.state, self.k.scaler, self.k.global_model, self.k.inbox,
                                self.k.events, self.k.lease, self.k.selected(1)],
                          args=[json.dumps(named), scaler, initial_global])
        if done == -1:
            raise LeaseLost(f"run {self.run_id}: lease lost before training opened")
        return bool(done)

    def commit_round(self, commit: Commit) -> bool:
        """Commit a round in one atomic step (see Commit for what it carries); False when the
        run is not at the round before it (a replay, or a round already committed). Fenced by
        the lease: LeaseLost if another aggregator took the run over meanwhile."""
        self.audit.flush(self.r)  # the round's judgements before its commit (none wait, after a close)
        members = self.member_ids() if commit.members is None else commit.members
        updates = [self.k.update(cid, commit.round) for cid in members] + list(commit.update_parts)
        named = {"round": commit.round, "driver": self.driver or "", "now": time.time(), "events_max": MAX_EVENTS,
                 "keep_updates": commit.keep_updates, "updates": len(updates), "after": commit.after,
                 "final": json.dumps(commit.final or {}), "next_selected": commit.next_selected,
                 "previous_metrics": "" if commit.previous_metrics is None else json.dumps(commit.previous_metrics)}
        done = self._commit(
            keys=[self.k.state, self.k.global_model, self.k.metrics, self.k.inbox, self.k.events,
                  self.k.lease, self.k.server_state, self.k.selected(commit.round), self.k.selected(commit.round + 1),
                  self.k.model_file, *updates, *commit.stale_parts],
            args=[json.dumps(named), commit.global_payload, json.dumps(commit.metrics), commit.server_state or b"",
                  commit.model_file or b""])
        if done == -1:
            raise LeaseLost(f"run {self.run_id}: lease lost before committing round {commit.round}")
        ok = bool(done)
        if ok and commit.after == Phase.DONE:
            self.r.xadd(keys.EVENTS, {"event": Event.FINISHED, "run": self.run_id}, maxlen=MAX_EVENTS,
                        approximate=True)
        return ok

    def commit_version(self, commit: VersionCommit) -> bool:
        """Commit a buffered version in one atomic step (scripts.COMMIT_VERSION); False when the
        run is not at the version before it. Fenced by the lease like commit_round."""
        self.audit.flush(self.r)
        folded = [(cid, seq) for (cid, _round), seq in commit.folded.items()]
        per_update = [key for (cid, rnd) in commit.folded for key in (self.k.update(cid, rnd), self.k.consumed(rnd))]
        named = {"round": commit.version, "driver": self.driver or "", "now": time.time(), "events_max": MAX_EVENTS,
                 "keep_updates": commit.keep_updates, "folded": folded, "after": commit.after,
                 "final": json.dumps(commit.final or {})}
        done = self._commit_version(
            keys=[self.k.state, self.k.global_model, self.k.metrics, self.k.inbox, self.k.events, self.k.lease,
                  self.k.server_state, self.k.version_model(commit.version), *per_update, *commit.drop],
            args=[json.dumps(named), commit.global_payload, json.dumps(commit.metrics), commit.server_state or b""])
        if done == -1:
            raise LeaseLost(f"run {self.run_id}: lease lost before committing version {commit.version}")
        if done and commit.after == Phase.DONE:
            self.r.xadd(keys.EVENTS, {"event": Event.FINISHED, "run": self.run_id}, maxlen=MAX_EVENTS,
                        approximate=True)
        return bool(done)

    def consumed(self, round_no: int) -> dict[str, str]:
        """Client id -> sequence number of its update for the round that a committed version folded."""
        return _fields(self.r.hgetall(self.k.consumed(round_no)))

    def version_payload(self, version: int) -> bytes | None:
        """The kept copy of a model version (buffered aggregation), or None."""
        return as_bytes(self.r.get(self.k.version_model(version)))

    def keep_version(self, version: int, payload: bytes) -> None:
        """Keep a copy of the committed model of this version unless one is kept already (a
        resumed driver's first step: every driver would write the same bytes)."""
        self.r.set(self.k.version_model(version), payload, nx=True)

    # --- strategies, client sampling, final evaluation --------------------------------------
    def server_state_payload(self) -> bytes | None:
        """The strategy's server state saved with the last commit (None: none saved)."""
        return as_bytes(self.r.get(self.k.server_state))

    def selected(self, round_no: int) -> set[str] | None:
        """Clients chosen to train in the round; None when the round does not sample clients."""
        members = self.r.smembers(self.k.selected(round_no))
        return {_str(m) for m in members} if members else None

    def is_selected(self, round_no: int, client_id: str) -> bool:
        """Whether client_id is chosen for a sampled round (False once the round's set is gone)."""
        return bool(self.r.sismember(self.k.selected(round_no), client_id))

    def last_metrics(self) -> dict[str, Any] | None:
        """The newest committed round's record."""
        raw = self.r.lindex(self.k.metrics, -1)
        return None if raw is None else json.loads(raw)

    def push_eval(self, client_id: str, round_no: int, payload: bytes, max_bytes: int) -> str:
        """Store a client's evaluation of the last global model; 'ok' or the refusal code (recorded)."""
        named = {"client": client_id, "round": int(round_no), "now": time.time(), "max_bytes": int(max_bytes),
                 "refused_max": MAX_REFUSED, "state": self.k.state, "members": self.k.members,
                 "selected": self.k.selected(round_no + 1), "inbox": self.k.inbox}
        return _s(self._push_eval(keys=[self.k.evaluation(client_id), self.k.client_refused(client_id)],
                                  args=[json.dumps(named), payload])) or ""

    def evals(self) -> dict[str, bytes]:
        """Client id -> stored evaluation payload (final-evaluation phase); a key of another
        type or over the record cap reads as absent."""
        ids = self.member_ids()
        values = guarded.strings(self.r, [self.k.evaluation(cid) for cid in ids])
        return {cid: v for cid, v in zip(ids, values) if v is not None}

    def finish_evaluation(self, round_no: int, last_metrics: dict[str, Any] | None,
                          final: dict[str, Any]) -> bool:
        """End the final-evaluation phase and the run (fenced by the lease)."""
        done = self._finish_eval(
            keys=[self.k.state, self.k.metrics, self.k.inbox, self.k.events, self.k.lease,
                  self.k.selected(round_no + 1), *[self.k.evaluation(cid) for cid in self.member_ids()]],
            args=[json.dumps({"round": round_no, "now": time.time(), "events_max": MAX_EVENTS,
                              "driver": self.driver or "", "final": json.dumps(final),
                              "last_metrics": "" if last_metrics is None else json.dumps(last_metrics)})])
        if done == -1:
            raise LeaseLost(f"run {self.run_id}: lease lost before finishing round {round_no}'s evaluation")
        if done:
            self.r.xadd(keys.EVENTS, {"event": Event.FINISHED, "run": self.run_id}, maxlen=MAX_EVENTS,
                        approximate=True)
        return bool(done)

    def fail(self, reason: str) -> bool:
        """Mark the run failed with a reason that clients, CLI and dashboard show.

        A driver only fails a run while it holds the lease; others (fedq run, tests) always may."""
        self.audit.flush(self.r)
        named = {"reason": reason, "now": time.time(), "events_max": MAX_EVENTS, "driver": self.driver or ""}
        done = self._fail(keys=[self.k.state, self.k.lease, self.k.events], args=[json.dumps(named)])
        if done == -1:
            return False
        self.r.xadd(keys.EVENTS, {"event": Event.FAILED, "run": self.run_id}, maxlen=MAX_EVENTS, approximate=True)
        return True


def list_runs(r: redis.Redis, newest_first: bool = True, limit: int = 100) -> list[str]:
    """Run ids by creation time; an entry that is no valid run id is skipped (logged once)."""
    ids = r.zrevrange(keys.RUNS, 0, limit - 1) if newest_first else r.zrange(keys.RUNS, 0, limit - 1)
    out = []
    for raw in ids:
        # Members only (no WITHSCORES); redis-py's type also covers (member, score) pairs.
        run_id = _str(raw) if isinstance(raw, (bytes, str)) else ""
        try:
            keys.check_run_id(run_id)
        except ConfigError:
            guarded.warn_once(keys.RUNS, f"entry {run_id[:80]!r} is no valid run id")
            continue
        out.append(run_id)
    return out


def newest_open_run(r: redis.Redis, client_id: str, skip: Collection[str] = frozenset()) -> str | None:
    """The newest run a client may join: not ended, and still joining (or already joined by it)."""
    for run_id in list_runs(r, limit=50):
        if run_id in skip:
            continue
        store = RunStore(r, run_id)
        st = store.state()
        if not st or st.get("status") in ENDED:
            continue
        joined = r.sismember(store.k.members, client_id)
        if joined or (st.get("phase") == Phase.JOIN and store.num_clients() < int(st.get("clients", 0))):
            return run_id
    return None


def last_global_event_id(r: redis.Redis) -> str:
    """Id of the newest entry in the global event stream ('0-0' when empty)."""
    entries = r.xrevrange(keys.EVENTS, count=1)
    return _str(entries[0][0]) if entries else "0-0"


def wait_global_event(r: redis.Redis, last_id: str, block_seconds: float) -> str:
    """Block up to block_seconds for any global event after last_id; returns the new last id."""
    reply = r.xread({keys.EVENTS: last_id}, block=max(1, int(block_seconds * 1000)), count=100)
    entries = _xread_entries(reply)
    return entries[-1][0] if entries else last_id
