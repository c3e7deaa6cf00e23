"""The secure-aggregation messages as they cross Redis: msgpack, versioned, checked on read.

What a client writes (``keys``, ``shares``, ``reveal``) is hostile until checked here: each
decoder checks the type, the size and every field, and raises ``SecAggError`` naming what was
wrong; nothing of a bad message is used. What the aggregator publishes (``roster``,
``sharers``, ``survivors``, a client's ``inbox``) is decoded as strictly by the clients.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgpack

from fedq.errors import ConfigError, SecAggError
from fedq.protocol.keys import check_client_id
from fedq.protocol.secagg.agreement import KEY_BYTES, NONCE_BYTES
from fedq.protocol.secagg.params import SecAggParams
from fedq.protocol.secagg.participant import MASK_KEY, SELF_MASK, Advert
from fedq.protocol.secagg.shamir import SHARE_BYTES

VERSION = 1
BUNDLE_BYTES = NONCE_BYTES + 16 + 2 * (SHARE_BYTES + 2) + 1  # nonce, tag, msgpack of two shares
MAX_CLIENTS = 10_000


def record_cap(clients: int) -> int:
    """The most bytes any secure-aggregation message of a run of ``clients`` may take."""
    return 4096 + clients * (96 + BUNDLE_BYTES)


def _pack(body: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb({"v": VERSION, **body}, use_bin_type=True)
    return packed


def _unpack(raw: object, what: str, fields: Sequence[str]) -> dict[str, Any]:
    if not isinstance(raw, bytes):
        raise SecAggError("malformed", f"{what}: not bytes")
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=len(raw), max_str_len=len(raw))
    except Exception as exc:
        raise SecAggError("malformed", f"{what}: not msgpack ({type(exc).__name__})") from None
    if not isinstance(body, dict) or body.get("v") != VERSION or set(body) != {"v", *fields}:
        raise SecAggError("malformed", f"{what}: expected version {VERSION} with fields {sorted(fields)}")
    return body


def _bytes(value: object, size: int | tuple[int, int], what: str) -> bytes:
    low, high = (size, size) if isinstance(size, int) else size
    if not isinstance(value, bytes) or not low <= len(value) <= high:
        raise SecAggError("malformed", f"{what}: expected {low if low == high else f'{low}-{high}'} bytes")
    return value


def _ids(value: object, what: str, limit: int = MAX_CLIENTS) -> list[str]:
    if not isinstance(value, (dict, list)) or len(value) > limit:
        raise SecAggError("malformed", f"{what}: expected at most {limit} client ids")
    out = list(value)
    for cid in out:
        try:
            check_client_id(cid)
        except ConfigError:
            raise SecAggError("malformed", f"{what}: {cid!r} is not a client id") from None
    return out


def _map(value: object, what: str, limit: int, check: Callable[[str, Any], Any]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SecAggError("malformed", f"{what}: expected a map")
    return {cid: check(cid, value[cid]) for cid in _ids(value, what, limit)}


# --- what a client writes -----------------------------------------------------------------------
def encode_keys(advert: Advert) -> bytes:
    return _pack({"mask": advert.mask_public, "channel": advert.channel_public})


def decode_keys(raw: object) -> Advert:
    body = _unpack(raw, "keys", ("mask", "channel"))
    return Advert(_bytes(body["mask"], KEY_BYTES, "keys.mask"), _bytes(body["channel"], KEY_BYTES, "keys.channel"))


def encode_shares(commitment: bytes, bundles: Mapping[str, bytes]) -> bytes:
    return _pack({"commit": commitment, "bundles": dict(bundles)})


def decode_shares(raw: object, expected_peers: frozenset[str]) -> tuple[bytes, dict[str, bytes]]:
    """A client's commitment and its bundles: exactly one for each of ``expected_peers``."""
    body = _unpack(raw, "shares", ("commit", "bundles"))
    commit = _bytes(body["commit"], 32, "shares.commit")
    bundles = _map(body["bundles"], "shares.bundles", len(expected_peers),
                   lambda cid, v: _bytes(v, BUNDLE_BYTES, f"shares.bundles[{cid}]"))
    if set(bundles) != expected_peers:
        raise SecAggError("malformed", f"shares: bundles for {sorted(bundles)}, expected its neighbours "
                                       f"{sorted(expected_peers)}")
    return commit, bundles


def encode_reveal(shares: Mapping[str, tuple[str, bytes]]) -> bytes:
    return _pack({"shares": {owner: [kind, share] for owner, (kind, share) in shares.items()}})


def decode_reveal(raw: object, group: frozenset[str]) -> dict[str, tuple[str, bytes]]:
    """A client's revealed shares, one per owner in its neighbourhood ``group`` (itself included)."""
    body = _unpack(raw, "reveal", ("shares",))

    def check(owner: str, v: object) -> tuple[str, bytes]:
        if owner not in group:
            raise SecAggError("malformed", f"reveal: {owner!r} is not in this client's neighbourhood")
        if not isinstance(v, list) or len(v) != 2 or v[0] not in (SELF_MASK, MASK_KEY):
            raise SecAggError("malformed", f"reveal[{owner}]: expected [kind, share]")
        return v[0], _bytes(v[1], SHARE_BYTES, f"reveal[{owner}]")
    return _map(body["shares"], "reveal.shares", len(group), check)


# --- what the aggregator publishes ----------------------------------------------------------------
def encode_roster(params: SecAggParams, seed: bytes, roster: Mapping[str, Advert]) -> bytes:
    p = params
    return _pack({"params": [p.num_shares, p.reconstruction_threshold, p.clipping_range, p.quantization_range,
                             p.max_weight], "seed": seed,
                  "clients": {c: [a.mask_public, a.channel_public] for c, a in roster.items()}})


def decode_roster(raw: object) -> tuple[SecAggParams, bytes, dict[str, Advert]]:
    body = _unpack(raw, "roster", ("params", "seed", "clients"))
    p = body["params"]
    if (not isinstance(p, list) or len(p) != 5 or any(isinstance(x, bool) for x in p)
            or not all(isinstance(p[i], int) for i in (0, 1, 3))
            or not all(isinstance(p[i], int | float) for i in (2, 4))):
        raise SecAggError("malformed", "roster.params: expected [shares, threshold, clip, levels, max weight]")
    params = SecAggParams(p[0], p[1], float(p[2]), p[3], max_weight=float(p[4]))

    def advert(cid: str, v: object) -> Advert:
        if not isinstance(v, list) or len(v) != 2:
            raise SecAggError("malformed", f"roster[{cid}]: expected two keys")
        return Advert(_bytes(v[0], KEY_BYTES, f"roster[{cid}]"), _bytes(v[1], KEY_BYTES, f"roster[{cid}]"))
    clients = _map(body["clients"], "roster.clients", MAX_CLIENTS, advert)
    try:
        params.check(len(clients))
    except ConfigError as exc:
        raise SecAggError("malformed", f"roster: {exc}") from None
    return params, _bytes(body["seed"], (16, 64), "roster.seed"), clients


def encode_sharers(commitments: Mapping[str, bytes]) -> bytes:
    return _pack({"clients": dict(commitments)})


def decode_sharers(raw: object) -> dict[str, bytes]:
    body = _unpack(raw, "sharers", ("clients",))
    return _map(body["clients"], "sharers", MAX_CLIENTS, lambda cid, v: _bytes(v, 32, f"sharers[{cid}]"))


def encode_survivors(survivors: Sequence[str]) -> bytes:
    return _pack({"clients": sorted(survivors)})


def decode_survivors(raw: object) -> set[str]:
    return set(_ids(_unpack(raw, "survivors", ("clients",))["clients"], "survivors"))


def encode_inbox(bundles: Mapping[str, bytes]) -> bytes:
    return _pack({"bundles": dict(bundles)})


def decode_inbox(raw: object) -> dict[str, bytes]:
    body = _unpack(raw, "inbox", ("bundles",))
    return _map(body["bundles"], "inbox", MAX_CLIENTS, lambda cid, v: _bytes(v, BUNDLE_BYTES, f"inbox[{cid}]"))
