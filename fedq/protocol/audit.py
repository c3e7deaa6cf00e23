"""The aggregator's audit trail of judged update versions, written without round trips of its own.

Each judgement (client, round, seq, digest, outcome, bytes) waits here until the aggregator's
next call to Redis, which carries it along in the same pipeline (RunStore.read_update,
pop_inbox, close_and_look): one XADD per update used to cost a round trip of its own on a
round's critical path. Entries leave in the order they were judged, before the command they
ride with runs, so nothing the aggregator does next can overtake them, and a commit is always
preceded by its round's judgements (RunStore flushes before committing).
"""

from __future__ import annotations

from typing import Any

import redis


class AuditTrail:
    """Judgements not yet written to the run's audit stream (keys.RunKeys.judged)."""

    def __init__(self, key: str, maxlen: int) -> None:
        self.key = key
        self.maxlen = maxlen  # the stream is capped (approximately), as a client's push log is
        self._pending: list[dict[str, Any]] = []

    def record(self, client_id: str, round_no: int, seq: str, digest: str, outcome: str, nbytes: int) -> None:
        """Queue one judgement for the next call to Redis."""
        self._pending.append({"client": client_id, "round": round_no, "seq": seq, "digest": digest,
                              "outcome": outcome, "bytes": nbytes})

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def into(self, pipe: Any) -> None:
        """Add the queued judgements to a pipeline (before the command they ride with)."""
        for entry in self._pending:
            pipe.xadd(self.key, entry, maxlen=self.maxlen, approximate=True)
        self._pending.clear()

    def flush(self, r: redis.Redis) -> None:
        """Write the queued judgements now (one round trip; none when nothing waits)."""
        if self._pending:
            pipe = r.pipeline(transaction=False)
            self.into(pipe)
            pipe.execute()
