"""The Redis key schema: every key fedq reads or writes is built here and nowhere else.

Keys are namespaced ``fedq:``; per-run keys carry the run id as a hash tag
(``fedq:{<run>}:...``) so that one run's keys share a Redis Cluster slot and the
commit script may touch all of them in one atomic step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedq.errors import ConfigError

PREFIX = "fedq"

RUNS = f"{PREFIX}:runs"  # sorted set: run id -> creation time (newest last)
EVENTS = f"{PREFIX}:events"  # stream: run created / started / finished, for waiting clients
AGGREGATORS = f"{PREFIX}:aggregators"  # prefix of aggregator heartbeats (strings with expiry)


def aggregator_alive(name: str) -> str:
    """String with expiry: JSON heartbeat of one aggregator worker (gone when it expires)."""
    return f"{AGGREGATORS}:{name}"


def aggregators_pattern() -> str:
    """SCAN pattern of every aggregator heartbeat."""
    return f"{AGGREGATORS}:*"


SECAGG_CLIENT_STAGES = ("keys", "shares", "reveal")  # what a client writes, in order
SECAGG_PUBLIC = ("roster", "sharers", "survivors")  # what the aggregator publishes, in order

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def check_run_id(run_id: str) -> str:
    """Return run_id if it is a safe key component (no braces, colons or spaces)."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise ConfigError(f"invalid run id {run_id!r}: use 1-64 letters, digits, '_' or '-' (rq job ids allow no more)")
    return run_id


def check_client_id(client_id: str) -> str:
    """Return client_id if it is a safe key component: no glob characters either, since ACL
    key patterns are built from it."""
    if not isinstance(client_id, str) or not _RUN_ID.match(client_id):
        raise ConfigError(f"invalid client id {client_id!r}: use 1-64 letters, digits, '_' or '-'")
    return client_id


@dataclass(frozen=True)
class RunKeys:
    """All keys of one run, hash-tagged on the run id."""

    run_id: str

    def __post_init__(self) -> None:
        check_run_id(self.run_id)

    @property
    def base(self) -> str:
        return f"{PREFIX}:{{{self.run_id}}}"

    @property
    def spec(self) -> str:
        """String: msgpack of the run spec (written once at creation)."""
        return f"{self.base}:spec"

    @property
    def state(self) -> str:
        """Hash: status, round (committed rounds), timestamps, reason, driver."""
        return f"{self.base}:state"

    @property
    def members(self) -> str:
        """Set: ids of the clients the aggregator admitted (only the aggregator writes it)."""
        return f"{self.base}:members"

    @property
    def scaler(self) -> str:
        """String: msgpack envelope with the combined mean and std."""
        return f"{self.base}:scaler"

    @property
    def global_model(self) -> str:
        """String: codec envelope of the current global weights (meta carries its round)."""
        return f"{self.base}:global"

    @property
    def initial(self) -> str:
        """String: the initial global model (envelope, or head with parts under global_part(0, k)),
        written with a run without central evaluation by its submitter; the aggregator commits it
        as round 0's model instead of building the model (a slim aggregator has no TensorFlow)."""
        return f"{self.base}:initial"

    def global_part(self, round_no: int, index: int) -> str:
        """String: one part of the global model after round_no, when it travels in parts."""
        return f"{self.global_model}:{int(round_no)}:{int(index)}"

    def version_model(self, version: int) -> str:
        """String: a copy of the global model of one version (buffered aggregation keeps the
        versions updates may still be trained from, so their deltas can be taken)."""
        return f"{self.global_model}:version:{int(version)}"

    def consumed(self, round_no: int) -> str:
        """Hash: client id -> sequence number of its update for the round that a committed
        version folded (buffered aggregation); a later push for that round is refused."""
        return f"{self.base}:consumed:{int(round_no)}"

    @property
    def inbox(self) -> str:
        """List: client ids, pushed beside each stored update; the aggregator blocks on it.

        Only a hint: the aggregator reads what the named client stored under its own keys."""
        return f"{self.base}:inbox"

    @property
    def joins(self) -> str:
        """Set: ids of clients whose join request waits for the aggregator. A client's join step
        adds its id (SADD is all its ACL user may do here); the aggregator takes ids off as it
        judges their requests. Only a hint, like the inbox: the request is what the named client
        filed under its own join key."""
        return f"{self.base}:joins"

    def update_taken(self, client_id: str, round_no: int) -> str:
        """String (the aggregator's alone): the bytes of the version of a client's update that
        the aggregator's read took from update_body, checked in size and type; out of the
        client's reach, so that a rebuild re-reads exactly what was judged."""
        return f"{self.base}:taken:{int(round_no)}:{check_client_id(client_id)}"

    def update_sent(self, client_id: str, round_no: int) -> str:
        """String (the aggregator's alone): the bytes the aggregator's read is about to receive,
        present only inside the read's MULTI (READ_UPDATE moves them here, the GET sends them,
        a RENAME puts them back under update_taken)."""
        return f"{self.update_taken(client_id, round_no)}:sent"

    def taken_seqs(self, round_no: int) -> str:
        """Hash (the aggregator's alone): client id -> sequence number of the version held under
        its update_taken key for the round."""
        return f"{self.base}:taken:{int(round_no)}"

    @property
    def global_staged(self) -> str:
        """String (the aggregator's alone): the next global model, written in the commit's MULTI
        just before the COMMIT step that moves it to global_model (or deletes it). Not under
        global*, which clients may read: a refused commit's model is nobody's to see."""
        return f"{self.base}:staged-global"

    # --- keys owned by one client: its ACL user may write these and no other run key ---
    def client_base(self, client_id: str) -> str:
        return f"{self.base}:c:{check_client_id(client_id)}"

    def client_pattern(self, client_id: str) -> str:
        """ACL key pattern of everything one client may write in this run."""
        return f"{self.client_base(client_id)}:*"

    def joined(self, client_id: str) -> str:
        """Hash: the client's join request, 'record' (shard, host, pid, rows) and 'stats' (feature
        sums and counts), JSON; 'verdict' (written by the aggregator) when it was refused."""
        return f"{self.client_base(client_id)}:join"

    def answered(self, client_id: str) -> str:
        """List: a wake-up for a client waiting to be admitted, pushed when the aggregator admits
        or refuses it (a hint only: the member set and the verdict are the answer)."""
        return f"{self.client_base(client_id)}:answered"

    def update(self, client_id: str, round_no: int) -> str:
        """Hash: 'seq' (how many times the client pushed for the round, which versions the
        update) and 'parts' (the push id of an update sent in parts) of one client's update for
        one round; its bytes are under update_body until the aggregator takes them."""
        return f"{self.client_base(client_id)}:update:{int(round_no)}"

    def update_body(self, client_id: str, round_no: int) -> str:
        """String: the codec envelope of the client's newest pushed version for the round (PUSH
        moves it here from update_staged), until the aggregator's read takes it (update_taken).
        Updates travel as plain SET and GET: a 4 MB value passed through a Lua script costs
        Redis several times the CPU of the command itself."""
        return f"{self.client_base(client_id)}:body:{int(round_no)}"

    def update_staged(self, client_id: str) -> str:
        """String: an update's bytes as the client's push writes them, in the same MULTI as the
        PUSH step that checks them and moves them to update_body (or deletes them)."""
        return f"{self.client_base(client_id)}:staged"

    def update_part(self, client_id: str, round_no: int, push_id: str, index: int) -> str:
        """String: one part of an update sent in parts (push_id keeps pushes apart)."""
        return f"{self.update(client_id, round_no)}:part:{push_id}:{int(index)}"

    def secagg(self, client_id: str, round_no: int, stage: str) -> str:
        """String: msgpack of one client's secure-aggregation message for a round: its public
        keys ('keys'), its commitment and sealed shares ('shares'), its revealed shares ('reveal')."""
        if stage not in SECAGG_CLIENT_STAGES:
            raise ValueError(f"unknown secure-aggregation stage {stage!r}")
        return f"{self.client_base(client_id)}:secagg:{int(round_no)}:{stage}"

    def evaluation(self, client_id: str) -> str:
        """String: JSON of the client's evaluation of the last global model (final evaluation)."""
        return f"{self.client_base(client_id)}:eval"

    def client_refused(self, client_id: str) -> str:
        """List: JSON records of this client's pushes refused at the door (closed round, ...)."""
        return f"{self.client_base(client_id)}:refused"

    def client_pushes(self, client_id: str) -> str:
        """Stream: audit of every push of this client (round, digest, outcome, bytes)."""
        return f"{self.client_base(client_id)}:pushes"

    def alive(self, client_id: str) -> str:
        """String with expiry: JSON heartbeat of one client in this run (gone when it expires)."""
        return f"{self.client_base(client_id)}:alive"

    def client_keys_pattern(self, kind: str) -> str:
        """SCAN pattern of one kind of per-client key (alive, refused, pushes, ...) in this run."""
        return f"{self.base}:c:*:{kind}"

    def client_of(self, key: str) -> str:
        """The client id inside a per-client key name of this run."""
        head = f"{self.base}:c:"
        if not key.startswith(head):
            raise ValueError(f"{key!r} is not a client key of run {self.run_id}")
        return key[len(head):].split(":", 1)[0]

    def secagg_public(self, round_no: int, what: str) -> str:
        """String (the aggregator's alone; clients read it): msgpack of a secure-aggregation
        round's public record: 'roster' (everyone's keys, the graph seed, the parameters),
        'sharers' (who shared, with their commitments), 'survivors' (who sent masked input)."""
        if what not in SECAGG_PUBLIC:
            raise ValueError(f"unknown secure-aggregation record {what!r}")
        return f"{self.base}:secagg:{int(round_no)}:{what}"

    def secagg_inbox(self, round_no: int, client_id: str) -> str:
        """String (the aggregator's alone): msgpack of the share bundles sealed to one client."""
        return f"{self.base}:secagg:{int(round_no)}:inbox:{check_client_id(client_id)}"

    def secagg_round_pattern(self, round_no: int) -> str:
        """SCAN pattern of the aggregator's secure-aggregation keys of one round (deleted at commit)."""
        return f"{self.base}:secagg:{int(round_no)}:*"

    @property
    def secagg_hints(self) -> str:
        """List: client ids, pushed beside each secure-aggregation message; the aggregator blocks
        on it (only a hint, like the inbox: it reads what the named client stored)."""
        return f"{self.base}:secagg-hints"

    @property
    def metrics(self) -> str:
        """List: msgpack of each committed round's metrics, in round order."""
        return f"{self.base}:metrics"

    @property
    def server_state(self) -> str:
        """String: codec envelope of the strategy's server state (momentum, Adam moments) after
        the committed round; written by the round commit itself, so the two always match."""
        return f"{self.base}:server-state"

    @property
    def model_file(self) -> str:
        """String: the final global model as a .keras file's bytes, stored by the aggregator with
        the last round's commit when it holds the Keras model (central evaluation) and the file
        fits FEDQ_MAX_MODEL_FILE_BYTES; the dashboard serves it as model.keras."""
        return f"{self.base}:model-file"

    def selected(self, round_no: int) -> str:
        """Set: the client ids chosen to train in the round (only when rounds sample clients)."""
        return f"{self.base}:selected:{int(round_no)}"

    @property
    def refused(self) -> str:
        """List: JSON records of updates the aggregator refused (client, round, reason, detail,
        time); refusals at push time go to the client's own list (client_refused)."""
        return f"{self.base}:refused"

    @property
    def judged(self) -> str:
        """Stream: the aggregator's judgement of every update version it read (client, round,
        seq, digest, outcome, bytes): the audit trail, which no client may read or write."""
        return f"{self.base}:judged"

    @property
    def events(self) -> str:
        """Stream: one entry per committed round and per status change; clients block on it."""
        return f"{self.base}:events"

    @property
    def lease(self) -> str:
        """String with expiry: the id of the one aggregator driving the run."""
        return f"{self.base}:lease"

    @property
    def standby(self) -> str:
        """String with expiry: set while an aggregator waits to take the run over."""
        return f"{self.base}:standby"

    @property
    def resume_lock(self) -> str:
        """String with expiry: one orphan-recovery enqueue at a time."""
        return f"{self.base}:resume-lock"

    def all(self) -> list[str]:
        """Fixed keys of the run (per-round update hashes are listed by pattern)."""
        return [self.spec, self.state, self.members, self.scaler, self.global_model, self.inbox, self.joins,
                self.metrics, self.refused, self.events, self.lease, self.standby, self.resume_lock,
                self.server_state, self.judged, self.secagg_hints, self.model_file,
                self.initial]
