"""Reads of keys a client can write: type and size are checked before the value is fetched.

A client's ACL user owns everything under ``fedq:{run}:c:<client>:*``: any of those keys may
hold any Redis type, of any size, with any content. Readers (aggregator, dashboard,
``fedq status``, worker maintenance) go through these helpers, which never raise on a value
of the wrong type and never transfer more than a cap: a bad key reads as absent and is logged
once. Every helper is a single pipeline of read commands (GETRANGE, MEMORY USAGE, ...), so the
read-only dashboard client and its ACL user may use them too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import redis

log = logging.getLogger("fedq.protocol.guarded")

# A small record (join record, heartbeat, evaluation, refusal): far more than any honest one.
RECORD_CAP = 1 << 20
# A client's list or stream as a whole (refusals, push audit), as MEMORY USAGE counts it.
COLLECTION_CAP = 64 << 20

_warned: set[str] = set()


def warn_once(key: str, what: str) -> None:
    """Log one warning per key and kind of problem (a flood of bad keys must not flood the log)."""
    tag = f"{key}\0{what}"
    if tag in _warned:
        return
    if len(_warned) < 10_000:
        _warned.add(tag)
    log.warning("ignoring %s: %s", key, what)


def _name(key: bytes | str) -> str:
    return key.decode("utf-8", "replace") if isinstance(key, bytes) else key


def strings(r: redis.Redis, keys: Sequence[str], cap: int = RECORD_CAP) -> list[bytes | None]:
    """The string value of each key, or None when absent, of another type or over cap bytes.

    STRLEN first, then GETRANGE (at most cap + 1 bytes, should a value grow in between) of the
    keys within the cap only: an oversized value costs a few bytes, not cap bytes, however
    often it is looked at (a member's heartbeat is read every half second near a deadline)."""
    if not keys:
        return []
    pipe = r.pipeline(transaction=False)
    for key in keys:
        pipe.strlen(key)
    sizes = pipe.execute(raise_on_error=False)
    wanted = [i for i, size in enumerate(sizes) if isinstance(size, int) and 0 < size <= cap]
    pipe = r.pipeline(transaction=False)
    for i in wanted:
        pipe.getrange(keys[i], 0, cap)
    values: list[Any] = [None] * len(keys)
    for i, value in zip(wanted, pipe.execute(raise_on_error=False) if wanted else []):
        values[i] = value
    out: list[bytes | None] = []
    for key, size, value in zip(keys, sizes, values):
        if isinstance(size, Exception) or isinstance(value, Exception):
            warn_once(key, f"not a string ({size if isinstance(size, Exception) else value})")
            out.append(None)
        elif (isinstance(size, int) and size > cap) or (value is not None and len(value) > cap):
            warn_once(key, f"larger than {cap} bytes")
            out.append(None)
        elif not value:
            out.append(None)  # absent (STRLEN 0)
        else:
            out.append(bytes(value) if not isinstance(value, bytes) else value)
    return out


def _sizes(r: redis.Redis, keys: Sequence[str], kind: str) -> list[int | None]:
    """MEMORY USAGE of each key that has the expected type (None: absent or another type)."""
    pipe = r.pipeline(transaction=False)
    for key in keys:
        pipe.type(key)
        pipe.memory_usage(key, samples=0)
    replies = pipe.execute(raise_on_error=False)
    out: list[int | None] = []
    for i, key in enumerate(keys):
        kind_reply, size = replies[2 * i], replies[2 * i + 1]
        found = _name(kind_reply) if isinstance(kind_reply, (bytes, str)) else "?"
        if found == "none":
            out.append(None)
        elif found != kind:
            warn_once(key, f"a {found}, not a {kind}")
            out.append(None)
        else:
            out.append(size if isinstance(size, int) else None)
    return out


def _read_within(r: redis.Redis, keys: Sequence[str], kind: str, cap: int,
                 read: Callable[[Any, str], Any]) -> dict[str, Any]:
    """key -> reply of read(pipeline, key) for each key of the given type whose MEMORY USAGE is
    within cap (the others are left out, logged once)."""
    sizes = _sizes(r, keys, kind)
    pipe = r.pipeline(transaction=False)
    wanted = []
    for key, size in zip(keys, sizes, strict=True):
        if size is not None and size > cap:
            warn_once(key, f"a {kind} of {size} bytes, over {cap}")
        elif size is not None:
            read(pipe, key)
            wanted.append(key)
    return dict(zip(wanted, pipe.execute(raise_on_error=False), strict=True)) if wanted else {}


def lists(r: redis.Redis, keys: Sequence[str], last: int = 1000,
          cap: int = COLLECTION_CAP) -> list[list[bytes]]:
    """The last `last` items of each list; [] for a key that is absent, not a list, or over cap."""
    got = _read_within(r, keys, "list", cap, lambda pipe, key: pipe.lrange(key, -last, -1)) if keys else {}
    return [v if isinstance(v := got.get(key), list) else [] for key in keys]


def streams(r: redis.Redis, keys: Sequence[str], last: int = 10_000,
            cap: int = COLLECTION_CAP) -> list[list[tuple[Any, dict[Any, Any]]]]:
    """The last `last` entries of each stream, oldest first; [] for a key that is absent, not a
    stream, or over cap."""
    got = _read_within(r, keys, "stream", cap, lambda pipe, key: pipe.xrevrange(key, count=last)) if keys else {}
    return [list(reversed(v)) if isinstance(v := got.get(key), list) else [] for key in keys]


def hash_fields(r: redis.Redis, keys: Sequence[str], fields: Sequence[str],
                cap: int = RECORD_CAP) -> list[list[bytes | None]]:
    """The given fields of each hash; all None for a key that is absent, not a hash, or over cap
    (the whole hash, as MEMORY USAGE counts it)."""
    got = _read_within(r, keys, "hash", cap, lambda pipe, key: pipe.hmget(key, list(fields))) if keys else {}
    none: list[bytes | None] = [None] * len(fields)
    return [v if isinstance(v := got.get(key), list) else list(none) for key in keys]
