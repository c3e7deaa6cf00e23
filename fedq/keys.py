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
QUEUE = "fedq-runs"  # rq queue name; rq itself owns the rq:queue:* keys

RUNS = f"{PREFIX}:runs"  # sorted set: run id -> creation time (newest last)
EVENTS = f"{PREFIX}:events"  # stream: run created / started / finished, for waiting clients
AGGREGATORS = f"{PREFIX}:aggregators"  # prefix of aggregator heartbeats (strings with expiry)


def aggregator_alive(name: str) -> str:
    """String with expiry: JSON heartbeat of one aggregator worker (gone when it expires)."""
    return f"{AGGREGATORS}:{name}"


def aggregators_pattern() -> str:
    """SCAN pattern of every aggregator heartbeat."""
    return f"{AGGREGATORS}:*"


_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def check_run_id(run_id: str) -> str:
    """Return run_id if it is a safe key component (no braces, colons or spaces)."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise ConfigError(f"invalid run id {run_id!r}: use 1-64 letters, digits, '_' or '-' (rq job ids allow no more)")
    return run_id


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
    def clients(self) -> str:
        """Hash: client id -> msgpack of its join record (shard, host, pid, rows)."""
        return f"{self.base}:clients"

    @property
    def stats(self) -> str:
        """Hash: client id -> msgpack of its feature statistics (sums and counts)."""
        return f"{self.base}:stats"

    @property
    def scaler(self) -> str:
        """String: msgpack envelope with the combined mean and std."""
        return f"{self.base}:scaler"

    @property
    def global_model(self) -> str:
        """String: codec envelope of the current global weights (meta carries its round)."""
        return f"{self.base}:global"

    @property
    def inbox(self) -> str:
        """List: client ids, pushed beside each stored update; the aggregator blocks on it."""
        return f"{self.base}:inbox"

    def updates(self, round_no: int) -> str:
        """Hash: client id -> codec envelope of that client's update for the round."""
        return f"{self.base}:updates:{int(round_no)}"

    def seqs(self, round_no: int) -> str:
        """Hash: client id -> how many times it pushed for the round (versions its update)."""
        return f"{self.base}:seqs:{int(round_no)}"

    @property
    def metrics(self) -> str:
        """List: msgpack of each committed round's metrics, in round order."""
        return f"{self.base}:metrics"

    @property
    def server_state(self) -> str:
        """String: codec envelope of the strategy's server state (momentum, Adam moments) after
        the committed round; written by the round commit itself, so the two always match."""
        return f"{self.base}:server-state"

    def selected(self, round_no: int) -> str:
        """Set: the client ids chosen to train in the round (only when rounds sample clients)."""
        return f"{self.base}:selected:{int(round_no)}"

    @property
    def evals(self) -> str:
        """Hash: client id -> JSON of its evaluation of the last global model (final evaluation)."""
        return f"{self.base}:evals"

    @property
    def refused(self) -> str:
        """List: msgpack records of refused updates (client, round, reason, detail, time)."""
        return f"{self.base}:refused"

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

    @property
    def pushes(self) -> str:
        """Stream: audit of every push (client, round, digest, outcome)."""
        return f"{self.base}:pushes"

    def all(self) -> list[str]:
        """Fixed keys of the run (per-round update hashes are listed by pattern)."""
        return [self.spec, self.state, self.clients, self.stats, self.scaler,
                self.global_model, self.inbox, self.metrics, self.refused, self.events,
                self.lease, self.standby, self.resume_lock, self.pushes, self.server_state, self.evals]

    @property
    def updates_pattern(self) -> str:
        return f"{self.base}:updates:*"

    @property
    def selected_pattern(self) -> str:
        return f"{self.base}:selected:*"

    def alive(self, client_id: str) -> str:
        """String with expiry: JSON heartbeat of one client in this run (gone when it expires)."""
        return f"{self.base}:alive:{client_id}"

    @property
    def alive_pattern(self) -> str:
        """SCAN pattern of the run's client heartbeats."""
        return f"{self.base}:alive:*"
