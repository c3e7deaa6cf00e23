"""Tests for fedq.protocol.codec: round trips, strict validation, and fuzzing of decode."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import numpy as np
import pytest
from blake3 import blake3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedq.errors import CodecError, FedqError
from fedq.protocol.codec import (
    ALIGN,
    MAGIC,
    SUPPORTED_DTYPES,
    V1,
    VERSION,
    Envelope,
    decode,
    digest,
    encode,
    pack_obj,
    unpack_obj,
)

ALL_DTYPES = sorted(SUPPORTED_DTYPES)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def sample(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Deterministic non-trivial values of the given dtype and shape."""
    size = int(np.prod(shape, dtype=np.int64))
    base = np.arange(size, dtype=np.int64).reshape(shape)
    if np.dtype(dtype).kind == "b":
        return (base % 3 == 0).astype(dtype)
    return (base % 100).astype(dtype)


def raw_tensor(**overrides: Any) -> dict[str, Any]:
    """A valid tensor entry (a 3x4 float32) with fields overridden or removed."""
    entry: dict[str, Any] = {
        "name": "dense/kernel",
        "dtype": "<f4",
        "shape": [3, 4],
        "data": bytes(48),
    }
    for key, value in overrides.items():
        if value is _DROP:
            del entry[key]
        else:
            entry[key] = value
    return entry


def raw_envelope(**overrides: Any) -> bytes:
    """A hand-built version 1 envelope (all msgpack) with top-level fields overridden or removed."""
    env: dict[str, Any] = {"v": V1, "kind": "update", "meta": {}, "tensors": [raw_tensor()]}
    for key, value in overrides.items():
        if value is _DROP:
            del env[key]
        else:
            env[key] = value
    return msgpack.packb(env, use_bin_type=True)


_DROP = object()


def valid_payload() -> bytes:
    return encode(
        "update",
        [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64)],
        meta={"round": 3, "client": "c1", "loss": 0.5, "ok": True, "extra": None},
        names=["w", "b"],
    )


# --------------------------------------------------------------------------- round trips


def test_codec_error_is_fedq_error() -> None:
    assert issubclass(CodecError, FedqError)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (7, 3, 5)])
def test_round_trip_every_dtype_and_shape(dtype: str, shape: tuple[int, ...]) -> None:
    arr = sample(dtype, shape)
    env = decode(encode("model", [arr]))
    (out,) = env.tensors
    assert out.dtype.str == dtype
    assert out.shape == shape
    np.testing.assert_array_equal(out, arr)
    assert not out.flags.writeable
    assert env.names == ["t0"]


def test_decoded_arrays_are_views_on_decoded_buffer() -> None:
    env = decode(encode("model", [np.arange(12, dtype=np.float64).reshape(3, 4)]))
    out = env.tensors[0]
    assert not out.flags.writeable
    assert out.base is not None
    assert isinstance(out.base, (bytes, np.ndarray, memoryview))
    with pytest.raises(ValueError):
        out[0, 0] = 1.0


def test_names_and_meta_round_trip() -> None:
    meta = {
        "round": 7,
        "loss": 0.125,
        "client": "alice",
        "done": False,
        "missing": None,
        "nested": {"a": [1, 2, {"b": "c"}], "big": 2**64 - 1, "neg": -(2**63)},
        "blob": b"\x00\x01",
    }
    tensors = [np.ones((2, 2), np.float32), np.zeros(3, np.int8)]
    env = decode(encode("update", tensors, meta=meta, names=["layer/w", "layer/b"]), "update")
    assert isinstance(env, Envelope)
    assert env.kind == "update"
    assert env.meta == meta
    assert env.names == ["layer/w", "layer/b"]
    for got, want in zip(env.tensors, tensors):
        np.testing.assert_array_equal(got, want)


def test_default_names_and_empty_envelope() -> None:
    env = decode(encode("ping", []))
    assert (env.kind, env.meta, env.names, env.tensors) == ("ping", {}, [], [])
    env = decode(encode("x", [np.zeros(1), np.zeros(2), np.zeros(3)]))
    assert env.names == ["t0", "t1", "t2"]


def test_tuple_meta_comes_back_as_list() -> None:
    assert decode(encode("k", [], meta={"t": (1, 2)})).meta == {"t": [1, 2]}


def test_non_contiguous_input() -> None:
    base = np.arange(60, dtype=np.float32).reshape(6, 10)
    views = [base.T, base[::2, 1::3], base[:, 3], np.asfortranarray(base)]
    env = decode(encode("model", views))
    for got, want in zip(env.tensors, views):
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("big", [">f2", ">f4", ">f8", ">i2", ">i4", ">i8", ">u2", ">u4", ">u8"])
def test_big_endian_input_becomes_little_endian(big: str) -> None:
    arr = np.arange(10).reshape(2, 5).astype(big)
    out = decode(encode("model", [arr])).tensors[0]
    assert out.dtype.str == "<" + big[1:]
    np.testing.assert_array_equal(out, arr)


def test_big_endian_scalar_and_numpy_scalar() -> None:
    env = decode(encode("s", [np.array(3.5, dtype=">f8"), np.float32(2.0)]))
    assert env.tensors[0].shape == () and env.tensors[0] == 3.5
    assert env.tensors[0].dtype.str == "<f8"
    assert env.tensors[1].shape == () and env.tensors[1].dtype.str == "<f4"


def test_encoding_does_not_mutate_input() -> None:
    arr = np.arange(5, dtype=">i4")
    before = arr.copy()
    encode("m", [arr])
    assert arr.dtype.str == ">i4"
    np.testing.assert_array_equal(arr, before)


def test_decode_accepts_bytearray_and_memoryview() -> None:
    payload = valid_payload()
    for form in (bytearray(payload), memoryview(payload)):
        env = decode(form)
        np.testing.assert_array_equal(env.tensors[1], [1, 2])


def test_encode_is_deterministic_and_digest() -> None:
    a, b = valid_payload(), valid_payload()
    assert a == b
    assert digest(a) == blake3(a).hexdigest()
    assert len(digest(a)) == 64
    # BLAKE3's published test vector for "abc" (256-bit output)
    assert digest(b"abc") == "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
    assert digest(a) != digest(encode("update", []))
    with pytest.raises(CodecError, match="bytes"):
        digest("not bytes")  # type: ignore[arg-type]


@FUZZ
@given(
    arr=hnp.arrays(
        dtype=st.sampled_from(ALL_DTYPES + [">f4", ">i8", ">u2", ">f2"]),
        shape=hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=5),
    ),
    name=st.text(max_size=20),
    transpose=st.booleans(),
)
@pytest.mark.slow
def test_property_round_trip(arr: np.ndarray, name: str, transpose: bool) -> None:
    if transpose:
        arr = arr.T
    env = decode(encode("prop", [arr], names=[name], meta={"n": name}), expect_kind="prop")
    (out,) = env.tensors
    assert env.names == [name]
    assert env.meta == {"n": name}
    assert out.shape == arr.shape
    assert out.dtype.str in SUPPORTED_DTYPES
    assert out.dtype == arr.dtype.newbyteorder("<")
    # Byte-level comparison so NaN payloads and -0.0 count as equal only when identical.
    want = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<")))
    assert out.tobytes() == want.tobytes()
    assert not out.flags.writeable


# --------------------------------------------------------------------------- encode errors


@pytest.mark.parametrize(
    "arr",
    [
        np.array([object(), 1], dtype=object),
        np.array([1 + 2j], dtype=np.complex64),
        np.array(["ab", "c"]),
        np.array([b"ab"]),
        np.array(["2020-01-01"], dtype="datetime64[D]"),
        np.array([1], dtype="timedelta64[s]"),
        np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")]),
    ],
    ids=["object", "complex", "unicode", "bytes", "datetime", "timedelta", "structured"],
)
def test_encode_rejects_unsupported_dtype(arr: np.ndarray) -> None:
    with pytest.raises(CodecError, match="unsupported dtype") as info:
        encode("m", [np.zeros(1), arr], names=["ok", "bad/tensor"])
    assert "bad/tensor" in str(info.value)
    assert str(arr.dtype) in str(info.value)


def test_encode_name_count_mismatch() -> None:
    with pytest.raises(CodecError, match="2 names for 1 tensors"):
        encode("m", [np.zeros(1)], names=["a", "b"])


def test_encode_bad_names_kind_and_tensors() -> None:
    with pytest.raises(CodecError, match="name must be a str"):
        encode("m", [np.zeros(1)], names=[3])  # type: ignore[list-item]
    with pytest.raises(CodecError, match="duplicate tensor name 'a'"):
        encode("m", [np.zeros(1), np.zeros(1)], names=["a", "a"])
    with pytest.raises(CodecError, match="kind must be a str"):
        encode(5, [])  # type: ignore[arg-type]
    with pytest.raises(CodecError, match=r"tensor 'x': expected numpy\.ndarray, got list"):
        encode("m", [[1, 2]], names=["x"])  # type: ignore[list-item]


def test_encode_too_many_dims() -> None:
    arr = np.zeros((1,) * 33)
    with pytest.raises(CodecError, match="33 dims"):
        encode("m", [arr])


@pytest.mark.parametrize(
    "meta, phrase",
    [
        ({"x": object()}, "meta\\['x'\\]: unsupported type"),
        ({"x": np.int64(3)}, "numpy.int64"),
        ({"x": {1: "a"}}, "not a str"),
        ({1: "a"}, "not a str"),
        ({"x": 2**64}, "outside msgpack"),
        ({"x": {1, 2}}, "unsupported type"),
    ],
)
def test_encode_rejects_bad_meta(meta: Any, phrase: str) -> None:
    with pytest.raises(CodecError, match=phrase):
        encode("m", [], meta=meta)


def test_encode_rejects_non_mapping_meta_and_too_deep_meta() -> None:
    with pytest.raises(CodecError, match="meta must be a mapping"):
        encode("m", [], meta=[1, 2])  # type: ignore[arg-type]
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    with pytest.raises(CodecError, match="nested deeper"):
        encode("m", [], meta={"d": deep})


# --------------------------------------------------------------------------- decode errors


@pytest.mark.parametrize(
    "payload, phrase",
    [
        (b"\xc1", "not valid msgpack"),
        (b"", "not valid msgpack"),
        (msgpack.packb([1, 2, 3]), "not a map"),
        (msgpack.packb("hello"), "not a map"),
        (msgpack.packb({1: 2}), "not valid msgpack"),  # strict_map_key
        (raw_envelope(v=7), "unsupported envelope version 7; this fedq reads 1 and 2"),
        (raw_envelope(v="1"), "unsupported envelope version"),
        (raw_envelope(v=True), "unsupported envelope version"),
        (raw_envelope(v=_DROP), "version"),
        (raw_envelope(kind=_DROP), "missing field 'kind'"),
        (raw_envelope(kind=3), "kind is not a str"),
        (raw_envelope(meta=_DROP), "missing field 'meta'"),
        (raw_envelope(meta=[1]), "meta is not a map"),
        (raw_envelope(meta={"t": msgpack.Timestamp(0)}), "unsupported type"),
        (raw_envelope(meta={"e": msgpack.ExtType(3, b"z")}), "msgpack.ExtType"),
        (raw_envelope(meta={b"k": 1}), "not a str"),
        (raw_envelope(tensors=_DROP), "missing field 'tensors'"),
        (raw_envelope(tensors={"a": 1}), "tensors is not a list"),
        (raw_envelope(extra=1), "unknown field"),
        (raw_envelope(tensors=[5]), "tensor #0 is not a map"),
        (raw_envelope(tensors=[raw_tensor(name=_DROP)]), "missing field 'name'"),
        (raw_envelope(tensors=[raw_tensor(dtype=_DROP)]), "missing field 'dtype'"),
        (raw_envelope(tensors=[raw_tensor(shape=_DROP)]), "missing field 'shape'"),
        (raw_envelope(tensors=[raw_tensor(data=_DROP)]), "missing field 'data'"),
        (raw_envelope(tensors=[raw_tensor(junk=1)]), "unknown field"),
        (raw_envelope(tensors=[raw_tensor(name=7)]), "name is not a str"),
        (raw_envelope(tensors=[raw_tensor(dtype=">f4")]), "tensor 'dense/kernel': unsupported dtype '>f4'"),
        (raw_envelope(tensors=[raw_tensor(dtype="|O")]), "unsupported dtype '|O'"),
        (raw_envelope(tensors=[raw_tensor(dtype="<c8")]), "unsupported dtype"),
        (raw_envelope(tensors=[raw_tensor(dtype=4)]), "unsupported dtype"),
        (raw_envelope(tensors=[raw_tensor(shape="3,4")]), "shape is not a list"),
        (raw_envelope(tensors=[raw_tensor(shape=[3, -4])]), "non-negative ints"),
        (raw_envelope(tensors=[raw_tensor(shape=[3, 4.0])]), "non-negative ints"),
        (raw_envelope(tensors=[raw_tensor(shape=[3, True])]), "non-negative ints"),
        (raw_envelope(tensors=[raw_tensor(shape=[3, [4]])]), "non-negative ints"),
        (raw_envelope(tensors=[raw_tensor(shape=[1] * 33)]), "33 dims"),
        (raw_envelope(tensors=[raw_tensor(data="x" * 48)]), "data is not bytes"),
        (
            raw_envelope(tensors=[raw_tensor(data=bytes(40))]),
            "tensor 'dense/kernel': 40 bytes for shape [3, 4] float32, expected 48",
        ),
        (raw_envelope(tensors=[raw_tensor(), raw_tensor()]), "duplicate tensor name"),
        (
            raw_envelope(tensors=[raw_tensor(dtype="|b1", shape=[2], data=b"\x01\x02")]),
            "bool data",
        ),
    ],
)
def test_decode_rejects_malformed(payload: bytes, phrase: str) -> None:
    with pytest.raises(CodecError) as info:
        decode(payload)
    assert phrase in str(info.value)


def test_hand_built_envelope_is_accepted() -> None:
    env = decode(raw_envelope())
    assert env.names == ["dense/kernel"]
    assert env.tensors[0].shape == (3, 4)


def test_decode_rejects_non_bytes() -> None:
    for bad in ("text", 12, None, [1, 2]):
        with pytest.raises(CodecError, match="payload must be bytes"):
            decode(bad)  # type: ignore[arg-type]


def test_decode_kind_mismatch() -> None:
    payload = valid_payload()
    assert decode(payload, expect_kind="update").kind == "update"
    with pytest.raises(CodecError, match="kind 'update' does not match expected 'model'"):
        decode(payload, expect_kind="model")


def test_decode_rejects_trailing_data() -> None:
    with pytest.raises(CodecError, match="1 bytes of trailing data"):
        decode(valid_payload() + b"\x00")
    with pytest.raises(CodecError, match="not valid msgpack"):
        decode(raw_envelope() + b"\x00")


# --- version 2: a msgpack header, then the tensors' bytes in place ---------------------------
def framed(header: dict[str, Any], *datas: bytes, fill: bytes = b"\0") -> bytes:
    """A hand-built version 2 payload: header as given, datas laid out as encode does (with
    fill as the padding byte)."""
    raw = msgpack.packb(header, use_bin_type=True)
    out = bytearray(MAGIC + struct.pack("<I", len(raw)) + raw)
    for data in datas:
        out += fill * (-len(out) % ALIGN) + data
    return bytes(out)


def _header(**overrides: Any) -> dict[str, Any]:
    entry = {k: v for k, v in raw_tensor().items() if k != "data"}
    head: dict[str, Any] = {"v": VERSION, "kind": "update", "meta": {}, "tensors": [entry]}
    head.update(overrides)
    return head


def test_encode_writes_version_2_and_decode_views_the_payload_without_copying() -> None:
    tensors = [sample("<f4", (3, 5)), sample("|b1", (7,)), sample("<f8", (2, 2)), sample("|u1", (0,))]
    payload = encode("update", tensors, meta={"round": 1})
    assert payload.startswith(MAGIC)
    env = decode(payload)
    base = np.frombuffer(payload, np.uint8).ctypes.data
    for got, want in zip(env.tensors, tensors):
        np.testing.assert_array_equal(got, want)
        assert not got.flags.writeable and not got.flags.owndata
        if got.size:  # a view into the payload's own bytes, at an aligned offset
            assert base <= got.ctypes.data < base + len(payload) and (got.ctypes.data - base) % ALIGN == 0
    # The same tensors in the same order give the same bytes (digests identify updates).
    assert encode("update", tensors, meta={"round": 1}) == payload


def test_version_1_payloads_are_still_read() -> None:
    env = decode(raw_envelope(tensors=[raw_tensor(data=np.arange(12, dtype="<f4").tobytes())]))
    np.testing.assert_array_equal(env.tensors[0], np.arange(12, dtype=np.float32).reshape(3, 4))


@pytest.mark.parametrize("payload, phrase", [
    (MAGIC + b"\x01\x00", "truncated inside its prefix"),
    (MAGIC + struct.pack("<I", 1000) + b"\x80", "runs past the payload"),
    (MAGIC + struct.pack("<I", 1) + b"\xc1", "header is not valid msgpack"),
    (framed(_header(v=V1), bytes(48)), "unsupported envelope version 1"),
    (framed(_header(tensors=[raw_tensor()]), bytes(48)), "unknown field(s) 'data'"),
    (framed(_header(), bytes(40)), "run past the payload's end"),
    (framed(_header(), bytes(48) + b"\x00"), "1 bytes of trailing data"),
    (framed(_header(), bytes(48), fill=b"\x07"), "padding before its data is not zero"),
    (framed(_header(tensors=[{"name": "b", "dtype": "|b1", "shape": [2]}]), b"\x01\x02"), "bool data"),
    (framed(_header(tensors=[{"name": "h", "dtype": "<f4", "shape": [2**40, 2**40]}])), "run past"),
    (framed(_header(kind=3), bytes(48)), "kind is not a str"),
])
def test_framed_decode_rejects_malformed(payload: bytes, phrase: str) -> None:
    with pytest.raises(CodecError) as info:
        decode(payload)
    assert phrase in str(info.value)


@FUZZ
@given(st.data())
def test_mutated_framed_payloads_decode_or_raise_codec_error(data: st.DataObject) -> None:
    payload = bytearray(encode("update", [sample("<f4", (5, 3)), sample("|b1", (4,))], meta={"x": 1}))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(payload) - 1))
        payload[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    try:
        env = decode(bytes(payload[:cut]))
    except CodecError:
        return
    assert sum(t.nbytes for t in env.tensors) <= cut


def test_decode_rejects_invalid_utf8() -> None:
    # fixstr of length 2 holding invalid UTF-8 as the envelope kind value.
    payload = raw_envelope(kind="ab").replace(b"\xa2ab", b"\xa2\xff\xfe")
    with pytest.raises(CodecError, match="not valid msgpack"):
        decode(payload)


def test_decode_rejects_deep_nesting() -> None:
    # 100k nested one-element arrays: msgpack's own stack limit must be wrapped.
    with pytest.raises(CodecError):
        decode(b"\x91" * 100_000 + b"\x00")
    nested: Any = 1
    for _ in range(40):
        nested = [nested]
    deep_meta = raw_envelope(meta={"d": nested})
    with pytest.raises(CodecError, match="nested deeper"):
        decode(deep_meta)


def test_memory_bomb_shapes_are_rejected_without_allocating() -> None:
    huge = raw_envelope(tensors=[raw_tensor(shape=[2**40, 2**40], data=b"")])
    with pytest.raises(CodecError, match="expected"):
        decode(huge)
    # Zero-size but with dimensions whose product NumPy cannot represent.
    zero = raw_envelope(tensors=[raw_tensor(shape=[0, 2**62, 2**62], data=b"")])
    with pytest.raises(CodecError, match="dense/kernel"):
        decode(zero)
    beyond = raw_envelope(tensors=[raw_tensor(shape=[0, 2**64 - 1], data=b"")])
    with pytest.raises(CodecError, match="non-negative ints"):
        decode(beyond)
    # A msgpack array header claiming 2**32-1 elements with no body.
    with pytest.raises(CodecError, match="not valid msgpack"):
        decode(b"\xdd\xff\xff\xff\xff")


def test_every_prefix_of_valid_envelope_is_rejected() -> None:
    payload = valid_payload()
    for cut in range(len(payload)):
        with pytest.raises(CodecError):
            decode(payload[:cut])


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_decode_or_codec_error(data: bytes) -> None:
    try:
        env = decode(data)
    except CodecError:
        return
    assert isinstance(env, Envelope)


@st.composite
def mutated_payloads(draw: st.DrawFn) -> bytes:
    buf = bytearray(valid_payload())
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        pos = draw(st.integers(0, len(buf)))
        if op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif pos < len(buf):
            if op == "flip":
                buf[pos] ^= 1 << draw(st.integers(0, 7))
            elif op == "set":
                buf[pos] = draw(st.integers(0, 255))
            else:
                del buf[pos]
    return bytes(buf)


@FUZZ
@given(mutated_payloads())
def test_mutated_payloads_decode_or_codec_error(data: bytes) -> None:
    try:
        env = decode(data, expect_kind=None)
    except CodecError:
        return
    assert isinstance(env, Envelope)
    for arr in env.tensors:
        assert isinstance(arr, np.ndarray)
        assert arr.dtype.str in SUPPORTED_DTYPES


# --------------------------------------------------------------------------- pack_obj / unpack_obj


def test_pack_obj_round_trip() -> None:
    obj = {"run": "r1", "clients": ["a", "b"], "round": 3, "lr": 0.01, "blob": b"\x00", "x": None}
    assert unpack_obj(pack_obj(obj)) == obj
    assert unpack_obj(bytearray(pack_obj([1, 2]))) == [1, 2]


def test_pack_obj_errors() -> None:
    with pytest.raises(CodecError, match="unsupported type"):
        pack_obj({"x": object()})
    with pytest.raises(CodecError, match="not a str"):
        pack_obj({1: 2})


def test_unpack_obj_errors() -> None:
    with pytest.raises(CodecError, match="not valid msgpack"):
        unpack_obj(b"\xc1")
    with pytest.raises(CodecError, match="not valid msgpack"):
        unpack_obj(pack_obj({"a": 1})[:-1])
    with pytest.raises(CodecError, match="payload must be bytes"):
        unpack_obj("str")  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="unsupported type"):
        unpack_obj(msgpack.packb(msgpack.ExtType(5, b"x")))


@FUZZ
@given(st.binary(max_size=200))
def test_unpack_obj_random_bytes(data: bytes) -> None:
    try:
        unpack_obj(data)
    except CodecError:
        pass
