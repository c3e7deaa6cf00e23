"""Secure-aggregation messages as they cross Redis: round trips, and hostile bytes refused by name."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedq.errors import SecAggError
from fedq.protocol.secagg import wire
from fedq.protocol.secagg.agreement import KeyPair, seal
from fedq.protocol.secagg.params import SecAggParams
from fedq.protocol.secagg.participant import MASK_KEY, SELF_MASK, Advert, Participant

PARAMS = SecAggParams.from_options(neighbours=2, threshold=2)
DECODERS = [wire.decode_keys, lambda raw: wire.decode_shares(raw, frozenset({"a", "b"})),
            lambda raw: wire.decode_reveal(raw, frozenset({"a", "b", "c"})), wire.decode_roster,
            wire.decode_sharers, wire.decode_survivors, wire.decode_inbox]


def test_round_trips() -> None:
    adverts = {c: Advert(KeyPair.generate().public, KeyPair.generate().public) for c in ("a", "b", "c")}
    assert wire.decode_keys(wire.encode_keys(adverts["a"])) == adverts["a"]
    bundle = seal(bytes(32), bytes(wire.BUNDLE_BYTES - 28), b"")
    assert len(bundle) == wire.BUNDLE_BYTES
    assert wire.decode_shares(wire.encode_shares(b"c" * 32, {"a": bundle, "b": bundle}), frozenset("ab")) \
        == (b"c" * 32, {"a": bundle, "b": bundle})
    shares = {"a": (SELF_MASK, bytes(66)), "c": (MASK_KEY, b"\x01" * 66)}
    assert wire.decode_reveal(wire.encode_reveal(shares), frozenset("abc")) == shares
    assert wire.decode_roster(wire.encode_roster(PARAMS, b"s" * 16, adverts)) == (PARAMS, b"s" * 16, adverts)
    assert wire.decode_sharers(wire.encode_sharers({"a": b"x" * 32})) == {"a": b"x" * 32}
    assert wire.decode_survivors(wire.encode_survivors(["b", "a"])) == {"a", "b"}
    assert wire.decode_inbox(wire.encode_inbox({"a": bundle})) == {"a": bundle}


def test_a_real_bundle_has_the_size_the_wire_expects() -> None:
    ps = {c: Participant("r", 1, c, PARAMS) for c in ("a", "b", "c")}
    roster = {c: p.advertise() for c, p in ps.items()}
    _commit, bundles = ps["a"].share(roster, b"seed")
    assert {len(b) for b in bundles.values()} == {wire.BUNDLE_BYTES}


def _pack(body: object) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


@pytest.mark.parametrize(("decode", "raw", "match"), [
    (wire.decode_keys, _pack({"v": 1, "mask": b"x" * 31, "channel": b"y" * 32}), r"keys.mask: expected 32 bytes"),
    (wire.decode_keys, _pack({"v": 2, "mask": b"x" * 32, "channel": b"y" * 32}), "expected version 1"),
    (wire.decode_keys, _pack({"v": 1, "mask": b"x" * 32, "channel": b"y" * 32, "more": 1}), "with fields"),
    (wire.decode_keys, _pack([1, 2]), "expected version 1"),
    (DECODERS[1], _pack({"v": 1, "commit": b"c" * 32, "bundles": {"a": b"x" * wire.BUNDLE_BYTES}}),
     r"bundles for \['a'\], expected its neighbours \['a', 'b'\]"),
    (DECODERS[1], _pack({"v": 1, "commit": b"c" * 32, "bundles": {"a": b"x", "b": b"y"}}), r"bundles\[a\]"),
    (DECODERS[2], _pack({"v": 1, "shares": {"z": ["b", bytes(66)]}}), "'z' is not in this client's neighbourhood"),
    (DECODERS[2], _pack({"v": 1, "shares": {"a": ["both", bytes(66)]}}), r"expected \[kind, share\]"),
    (DECODERS[2], _pack({"v": 1, "shares": {"a:*": ["b", bytes(66)]}}), "is not a client id"),
    (wire.decode_survivors, _pack({"v": 1, "clients": [1, 2]}), "is not a client id"),
    (wire.decode_roster, _pack({"v": 1, "params": [float("inf"), 2, 8.0, 2**22, 1000.0], "seed": b"s" * 16,
                                "clients": {}}), r"roster.params: expected \[shares"),
    (wire.decode_roster, _pack({"v": 1, "params": [3, 2, 8.0, 2**22, 1000.0], "seed": b"s" * 16, "clients": {}}),
     "needs at least 2 clients"),
])
def test_hostile_messages_are_refused_by_name(decode, raw: bytes, match: str) -> None:
    with pytest.raises(SecAggError, match=match):
        decode(raw)


VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.binary(max_size=70)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)
FIELDS = ["mask", "channel", "commit", "bundles", "shares", "params", "seed", "clients"]
# Mostly the right envelope (version 1, the decoders' field names) around values of any shape.
MESSAGES = st.one_of(st.binary(max_size=300), st.builds(_pack, VALUES), st.builds(
    lambda body: _pack({"v": 1, **body}), st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=3)))


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(range(len(DECODERS))), MESSAGES)
def test_any_bytes_either_decode_or_raise_secagg_error(which: int, raw: bytes) -> None:
    try:
        DECODERS[which](raw)
    except SecAggError:
        pass
