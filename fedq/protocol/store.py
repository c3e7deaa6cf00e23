"""One run's store (RunStore), composed of the protocol's steps by concept, and the index of runs.

- fedq.protocol.run_records: the run's keys and what any role reads (the base);
- fedq.protocol.client_steps: a client joins, pushes updates and evaluations;
- fedq.protocol.joins: the driver admits or refuses join requests;
- fedq.protocol.update_reads: the driver reads the inbox and pushed updates, records refusals;
- fedq.protocol.fencing: the lease and every write it fences (open, close, commit, fail).

Connecting is fedq.protocol.connection; decoding replies, fedq.protocol.replies.
"""

from __future__ import annotations

from collections.abc import Collection

import redis

from fedq.errors import ConfigError
from fedq.protocol import guarded, keys
from fedq.protocol.client_steps import ClientSteps
from fedq.protocol.fencing import FencedSteps
from fedq.protocol.joins import JoinSteps
from fedq.protocol.replies import text, xread_entries
from fedq.protocol.vocabulary import ENDED, Phase


class RunStore(ClientSteps, JoinSteps, FencedSteps):
    """Reads and writes one run's keys: every step of the round protocol, client's and driver's."""


def list_runs(r: redis.Redis, newest_first: bool = True, limit: int = 100) -> list[str]:
    """Run ids by creation time; an entry that is no valid run id is skipped (logged once)."""
    ids = r.zrevrange(keys.RUNS, 0, limit - 1) if newest_first else r.zrange(keys.RUNS, 0, limit - 1)
    out = []
    for raw in ids:
        # Members only (no WITHSCORES); redis-py's type also covers (member, score) pairs.
        run_id = text(raw) if isinstance(raw, (bytes, str)) else ""
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
    return text(entries[0][0]) if entries else "0-0"


def wait_global_event(r: redis.Redis, last_id: str, block_seconds: float) -> str:
    """Block up to block_seconds for any global event after last_id; returns the new last id."""
    reply = r.xread({keys.EVENTS: last_id}, block=max(1, int(block_seconds * 1000)), count=100)
    entries = xread_entries(reply)
    return entries[-1][0] if entries else last_id
