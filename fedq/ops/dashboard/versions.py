"""What the run page shows of a buffered run's model versions (--aggregation buffered, FedBuff).

Each committed version's record (fedq.roles.buffered.version_record) lists the updates it folded,
each with the version it trained from and its staleness. The page draws staleness per version
(mean and max) and lists, per version, its updates, their staleness, the base versions they came
from and the clients. Records are read from Redis, where the aggregator wrote them: a field of
the wrong type reads as absent, never as an error. A sync run has no versions (an empty list).
"""

from __future__ import annotations

from collections import Counter
from typing import Any


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def version_row(m: dict[str, Any]) -> dict[str, Any] | None:
    """One version's row, or None for a record that is no version's (a sync round)."""
    version = _int(m.get("version"))
    if version is None:
        return None
    listed = m.get("updates")
    updates = [u for u in listed if isinstance(u, dict)] if isinstance(listed, list) else []
    taus = [t for t in (_int(u.get("staleness")) for u in updates) if t is not None]
    bases = Counter(b for b in (_int(u.get("base")) for u in updates) if b is not None)
    clients = m.get("clients")
    clients = clients if isinstance(clients, dict) else {}
    return {
        "version": version,
        "num_updates": _int(m.get("num_updates")),
        "staleness_mean": _number(m.get("staleness_mean")),
        "staleness_max": _int(m.get("staleness_max")),
        "staleness": {str(t): n for t, n in sorted(Counter(taus).items())},  # staleness -> updates that old
        "bases": {str(b): n for b, n in sorted(bases.items())},  # base version -> updates from it
        "clients": sorted(str(c) for c in clients),
    }


def version_rows(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of a buffered run's committed versions, oldest first ([] for a sync run)."""
    return [row for row in (version_row(m) for m in metrics if isinstance(m, dict)) if row is not None]
