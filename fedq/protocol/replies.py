"""Redis replies as fedq reads them: text, hashes, streams and JSON records, decoded without
trusting them (keys and fields may have been written around the protocol)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from fedq.errors import ConfigError
from fedq.protocol import keys


def opt_text(raw: bytes | str | None) -> str | None:
    """A reply as text (None stays None); bad bytes are replaced, never fatal to a loop."""
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw


def text(raw: bytes | str | None) -> str:
    """A key, field, member or entry id as text ('' for none: redis-py types them `bytes | str | None`)."""
    return opt_text(raw) or ""


def text_fields(raw: Mapping[bytes | str, bytes | str] | None) -> dict[str, str]:
    """A hash's or a stream entry's fields as text ({} for none)."""
    return {text(k): text(v) for k, v in (raw or {}).items()}


def as_bytes(raw: bytes | str | None) -> bytes | None:
    """A binary value (a model, a scaler): fedq's connections leave replies undecoded (redis-py's
    default), so it is bytes; redis-py's type also covers clients made with decode_responses."""
    if isinstance(raw, str):
        raise TypeError("Redis returned a binary value as text: connect without decode_responses")
    return raw


def xread_entries(reply: list[list[Any]] | Mapping[Any, Any] | None) -> list[tuple[str, dict[str, str]]]:
    """(id, fields) of every entry of an XREAD reply, oldest first. fedq's connections speak RESP2
    (redis-py's default): [[stream, [(id, fields), ...]], ...], or nothing when the block timed out;
    redis-py's type also covers RESP3's mapping."""
    if isinstance(reply, Mapping):
        raise TypeError("XREAD replied in RESP3's shape: fedq connects with RESP2 (protocol=2)")
    return [(text(entry_id), text_fields(values)) for _stream, entries in reply or [] for entry_id, values in entries]


def stream_order(entry_id: bytes | str | None) -> tuple[int, int]:
    """A stream entry id as (milliseconds, sequence), for sorting entries of several streams."""
    ms, _, seq = (opt_text(entry_id) or "0-0").partition("-")
    return int(ms), int(seq or 0)


def json_object(raw: bytes | str | None) -> dict[str, Any] | None:
    """A JSON object, or None for anything else (absent, not JSON, not an object)."""
    if raw is None:
        return None
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def json_list(raws: list[bytes]) -> list[dict[str, Any]]:
    """Decode a list of JSON records, skipping any that are not JSON objects."""
    return [rec for rec in map(json_object, raws) if rec is not None]


def refusal(rec: dict[str, Any]) -> dict[str, Any] | None:
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


def raise_any(replies: list[Any]) -> None:
    """Raise the first error among pipelined replies (e.g. the audit entries that rode along)."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
