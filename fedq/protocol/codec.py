"""The one wire codec: tensors plus metadata in a versioned envelope.

Everything that crosses Redis goes through here. Pickle is never used, because
payloads come from other processes (possibly other machines) and must be safe
to decode no matter what bytes arrive: decoding either yields an ``Envelope``
or raises ``CodecError`` naming what was wrong.

Version 2 (written): ``MAGIC``, the header's length (uint32, little-endian), a
msgpack header ``{v, kind, meta, tensors: [{name, dtype, shape}]}``, then each
tensor's raw little-endian bytes in order, each starting at a multiple of 16 bytes
(zero padding between). Encoding copies the tensors once, into the payload;
decoding copies nothing: the arrays are read-only views of the payload bytes.
Version 1 (still read): one msgpack map with each tensor's bytes inline under
``data`` (msgpack copies them in on encode and out again on decode).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
from blake3 import blake3

from fedq.errors import CodecError

VERSION: int = 2  # the layout encode() writes
V1: int = 1  # the all-msgpack layout, still decoded
MAGIC: bytes = b"\xc1FQ\x02"  # 0xc1 is never used by msgpack: no v1 payload starts so
ALIGN: int = 16  # each tensor's bytes start at a multiple of this (from the payload's start)
_PREFIX = len(MAGIC) + 4

# Little-endian dtype.str spellings only, so the wire format does not depend on
# the byte order of the machine that wrote it.
SUPPORTED_DTYPES: frozenset[str] = frozenset(
    {
        "<f2",
        "<f4",
        "<f8",
        "|i1",
        "<i2",
        "<i4",
        "<i8",
        "|u1",
        "<u2",
        "<u4",
        "<u8",
        "|b1",
    }
)

# Mirrors NumPy 1.x's limit; NumPy 2 allows 64, but a model tensor never needs
# that many and a fixed bound keeps the format the same across NumPy versions.
MAX_DIMS: int = 32

# Nesting bound for meta values: stays far below Python's recursion limit so
# validating hostile input can never raise RecursionError.
_MAX_META_DEPTH: int = 32

# msgpack's integer range; anything outside cannot be packed.
_INT_MIN: int = -(2**63)
_INT_MAX: int = 2**64 - 1

# Any single dimension must fit NumPy's index type, otherwise reshape fails.
_DIM_MAX: int = int(np.iinfo(np.intp).max)

_ENVELOPE_FIELDS: frozenset[str] = frozenset({"v", "kind", "meta", "tensors"})
_TENSOR_FIELDS: dict[int, tuple[str, ...]] = {V1: ("name", "dtype", "shape", "data"),
                                              VERSION: ("name", "dtype", "shape")}


@dataclass(frozen=True)
class Envelope:
    """A decoded payload: its kind, metadata and named read-only tensors."""

    kind: str
    meta: dict[str, Any]
    names: list[str]
    tensors: list[np.ndarray]


def _describe(obj: Any) -> str:
    """Short description of an untrusted value for error messages."""
    # Only scalars get a repr: repr of a deeply nested hostile container can be
    # slow or hit the recursion limit, and would bloat the message anyway.
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        text = repr(obj)
        return text if len(text) <= 60 else text[:57] + "..."
    return type(obj).__name__


def _describe_keys(keys: set[Any]) -> str:
    """Describe a few unexpected map keys for an error message."""
    # Capped: a hostile map may carry thousands of junk keys.
    shown = sorted(_describe(k) for k in keys)
    suffix = f" and {len(shown) - 5} more" if len(shown) > 5 else ""
    return ", ".join(shown[:5]) + suffix


def _check_plain(value: Any, where: str, depth: int = 0) -> None:
    """Raise CodecError unless value is made only of msgpack-plain types."""
    # Checked on both sides so that whatever encode accepts, decode (with
    # strict_map_key) reads back, and decode never hands out msgpack ext
    # objects such as Timestamp.
    if depth > _MAX_META_DEPTH:
        raise CodecError(f"{where}: nested deeper than {_MAX_META_DEPTH} levels")
    if value is None or isinstance(value, (bool, float, str, bytes)):
        return
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise CodecError(f"{where}: integer {value} is outside msgpack's 64-bit range")
        return
    if isinstance(value, msgpack.ExtType):
        # ExtType is a namedtuple, so it must be caught before the tuple case.
        raise CodecError(f"{where}: unsupported type msgpack.ExtType (code {value.code})")
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise CodecError(f"{where}: map key {_describe(key)} is not a str")
            _check_plain(item, f"{where}[{key!r}]", depth + 1)
        return
    raise CodecError(
        f"{where}: unsupported type {type(value).__module__}.{type(value).__qualname__} "
        "(use str/int/float/bool/None/bytes/list/dict)"
    )


def _tensor_bytes(name: str, tensor: Any) -> tuple[str, list[int], memoryview]:
    """Validate one tensor and return its dtype string, shape and raw LE bytes."""
    if isinstance(tensor, np.generic):
        tensor = np.asarray(tensor)
    if not isinstance(tensor, np.ndarray):
        raise CodecError(f"tensor {name!r}: expected numpy.ndarray, got {type(tensor).__name__}")
    # Drop ndarray subclasses (matrix, masked) so reshape/view below behave plainly.
    arr = np.asarray(tensor)
    le_dtype = arr.dtype.newbyteorder("<")
    if le_dtype.str not in SUPPORTED_DTYPES:
        raise CodecError(f"tensor {name!r}: unsupported dtype {arr.dtype} ({arr.dtype.str!r})")
    if arr.ndim > MAX_DIMS:
        raise CodecError(f"tensor {name!r}: {arr.ndim} dims, at most {MAX_DIMS} allowed")
    # copy=False: no copy at all when the array is already C-contiguous
    # little-endian; otherwise exactly one copy that fixes order and layout.
    contiguous = arr.astype(le_dtype, order="C", copy=False)
    # reshape(-1) on a C-contiguous array is a view (also turns 0-d into 1-d),
    # and the uint8 view gives msgpack a flat byte buffer to pack as bin.
    raw = contiguous.reshape(-1).view(np.uint8).data
    return le_dtype.str, [int(d) for d in arr.shape], raw


def encode(
    kind: str,
    tensors: Sequence[np.ndarray],
    meta: Mapping[str, Any] | None = None,
    names: Sequence[str] | None = None,
) -> bytes:
    """Encode tensors and metadata into a versioned msgpack envelope."""
    if not isinstance(kind, str):
        raise CodecError(f"kind must be a str, got {type(kind).__name__}")
    tensor_list = list(tensors)
    if names is None:
        name_list = [f"t{i}" for i in range(len(tensor_list))]
    else:
        name_list = list(names)
        if len(name_list) != len(tensor_list):
            raise CodecError(f"got {len(name_list)} names for {len(tensor_list)} tensors")
    seen: set[str] = set()
    for i, name in enumerate(name_list):
        if not isinstance(name, str):
            raise CodecError(f"tensor #{i}: name must be a str, got {type(name).__name__}")
        if name in seen:
            raise CodecError(f"duplicate tensor name {name!r}")
        seen.add(name)

    if meta is None:
        meta_dict: dict[str, Any] = {}
    elif isinstance(meta, Mapping):
        meta_dict = dict(meta)
    else:
        raise CodecError(f"meta must be a mapping, got {type(meta).__name__}")
    _check_plain(meta_dict, "meta")

    entries, raws = [], []
    for name, tensor in zip(name_list, tensor_list):
        dtype_str, shape, raw = _tensor_bytes(name, tensor)
        entries.append({"name": name, "dtype": dtype_str, "shape": shape})
        raws.append(raw)

    try:
        header = msgpack.packb({"v": VERSION, "kind": kind, "meta": meta_dict, "tensors": entries},
                               use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        # Only reachable for oversize meta (a bin or str is limited to 4 GiB).
        raise CodecError(f"could not encode envelope: {exc}") from exc
    if len(header) >= 2**32:
        raise CodecError(f"envelope header of {len(header)} bytes is too large")
    pieces: list[bytes | memoryview] = [MAGIC, struct.pack("<I", len(header)), header]
    pos = _PREFIX + len(header)
    for raw in raws:
        pad = -pos % ALIGN
        if pad:
            pieces.append(bytes(pad))
        pieces.append(raw)
        pos += pad + raw.nbytes
    # join sizes the result first and copies each piece into it once: the tensors' only copy.
    return b"".join(pieces)


def _tensor_entry(index: int, entry: Any, version: int) -> tuple[str, str, np.dtype, list[int], int]:
    """Validate one tensor entry of a decoded header: (name, label, dtype, shape, byte size)."""
    if not isinstance(entry, dict):
        raise CodecError(f"tensor #{index} is not a map (got {_describe(entry)})")
    fields = _TENSOR_FIELDS[version]
    for field in fields:
        if field not in entry:
            raise CodecError(f"tensor #{index} is missing field {field!r}")
    extra = set(entry) - set(fields)
    if extra:
        raise CodecError(f"tensor #{index} has unknown field(s) {_describe_keys(extra)}")

    name = entry["name"]
    if not isinstance(name, str):
        raise CodecError(f"tensor #{index}: name is not a str (got {_describe(name)})")
    label = f"tensor {name!r}"

    dtype_str = entry["dtype"]
    if not isinstance(dtype_str, str) or dtype_str not in SUPPORTED_DTYPES:
        raise CodecError(
            f"{label}: unsupported dtype {_describe(dtype_str)} "
            f"(allowed: {', '.join(sorted(SUPPORTED_DTYPES))})"
        )
    dtype = np.dtype(dtype_str)

    shape = entry["shape"]
    if not isinstance(shape, list):
        raise CodecError(f"{label}: shape is not a list (got {_describe(shape)})")
    if len(shape) > MAX_DIMS:
        raise CodecError(f"{label}: {len(shape)} dims, at most {MAX_DIMS} allowed")
    for dim in shape:
        # bool is an int subclass; True as a dimension is malformed, not 1.
        if not isinstance(dim, int) or isinstance(dim, bool) or not 0 <= dim <= _DIM_MAX:
            raise CodecError(
                f"{label}: shape must be a list of non-negative ints, found {_describe(dim)}"
            )

    # Exact Python-int arithmetic: a hostile shape with an astronomical product
    # is rejected by the size checks that follow, before NumPy sees it.
    return name, label, dtype, shape, math.prod(shape) * dtype.itemsize


def _array(label: str, data: bytes | memoryview, dtype: np.dtype, shape: list[int]) -> np.ndarray:
    """A read-only array viewing data (which has exactly the tensor's byte size)."""
    if dtype.kind == "b" and len(data) and int(np.frombuffer(data, dtype=np.uint8).max()) > 1:
        # NumPy would accept other byte values as bools, but they compare oddly.
        raise CodecError(f"{label}: bool data contains bytes other than 0 and 1")
    try:
        # Zero-copy view onto immutable bytes, hence read-only.
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    except ValueError as exc:
        # e.g. a zero-size shape whose non-zero dims still overflow NumPy's size.
        raise CodecError(f"{label}: cannot build array of shape {shape}: {exc}") from exc


def _decode_tensor(index: int, entry: Any) -> tuple[str, np.ndarray]:
    """A version 1 tensor entry (its bytes inline) as (name, array)."""
    name, label, dtype, shape, expected = _tensor_entry(index, entry, V1)
    data = entry["data"]
    if not isinstance(data, bytes):
        raise CodecError(f"{label}: data is not bytes (got {_describe(data)})")
    if len(data) != expected:
        raise CodecError(
            f"{label}: {len(data)} bytes for shape {shape} {dtype.name}, expected {expected}"
        )
    return name, _array(label, data, dtype, shape)


def decode(payload: bytes | bytearray | memoryview, expect_kind: str | None = None) -> Envelope:
    """Decode and strictly validate an envelope; any malformed input raises CodecError."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CodecError(f"payload must be bytes, got {type(payload).__name__}")
    if bytes(payload[:len(MAGIC)]) == MAGIC:
        return _decode_framed(bytes(payload) if not isinstance(payload, bytes) else payload, expect_kind)
    obj = _unpack(payload, "payload")
    return _envelope(obj, V1, expect_kind, _decode_tensor)


def _unpack(raw: bytes | bytearray | memoryview, what: str) -> Any:
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:
        # Deliberately broad: msgpack signals truncation, extra data, bad UTF-8,
        # nesting depth and buffer problems with assorted exception types, and
        # every one of them means the same thing to the caller.
        raise CodecError(f"{what} is not valid msgpack: {type(exc).__name__}: {exc}") from exc


def _decode_framed(payload: bytes, expect_kind: str | None) -> Envelope:
    """A version 2 payload: header, then the tensors' bytes, viewed in place."""
    if len(payload) < _PREFIX:
        raise CodecError(f"payload of {len(payload)} bytes is truncated inside its prefix")
    (hlen,) = struct.unpack_from("<I", payload, len(MAGIC))
    if _PREFIX + hlen > len(payload):
        raise CodecError(f"header of {hlen} bytes runs past the payload's {len(payload)} bytes")
    view = memoryview(payload)
    obj = _unpack(view[_PREFIX:_PREFIX + hlen], "header")
    pos = _PREFIX + hlen

    def tensor(index: int, entry: Any) -> tuple[str, np.ndarray]:
        nonlocal pos
        name, label, dtype, shape, size = _tensor_entry(index, entry, VERSION)
        start = pos + (-pos % ALIGN)
        if start + size > len(payload):
            raise CodecError(f"{label}: its {size} bytes run past the payload's end")
        if any(view[pos:start]):
            raise CodecError(f"{label}: padding before its data is not zero")
        pos = start + size
        return name, _array(label, view[start:pos], dtype, shape)

    env = _envelope(obj, VERSION, expect_kind, tensor)
    if pos != len(payload):
        raise CodecError(f"{len(payload) - pos} bytes of trailing data after the last tensor")
    return env


def _envelope(obj: Any, version_read: int, expect_kind: str | None,
              tensor: Callable[[int, Any], tuple[str, np.ndarray]]) -> Envelope:
    """Check a decoded envelope (v1) or header (v2) and build its tensors with tensor(i, entry)."""
    if not isinstance(obj, dict):
        raise CodecError(f"envelope is not a map (got {_describe(obj)})")
    if "v" not in obj:
        raise CodecError("envelope has no version field 'v'")
    version = obj["v"]
    if not isinstance(version, int) or isinstance(version, bool) or version != version_read:
        raise CodecError(
            f"unsupported envelope version {_describe(version)}; this fedq reads {V1} and {VERSION}"
            f" (this payload's layout is version {version_read})"
        )
    for field in ("kind", "meta", "tensors"):
        if field not in obj:
            raise CodecError(f"envelope is missing field {field!r}")
    extra = set(obj) - _ENVELOPE_FIELDS
    if extra:
        raise CodecError(f"envelope has unknown field(s) {_describe_keys(extra)}")

    kind = obj["kind"]
    if not isinstance(kind, str):
        raise CodecError(f"envelope kind is not a str (got {_describe(kind)})")
    if expect_kind is not None and kind != expect_kind:
        raise CodecError(f"envelope kind {kind!r} does not match expected {expect_kind!r}")

    meta = obj["meta"]
    if not isinstance(meta, dict):
        raise CodecError(f"envelope meta is not a map (got {_describe(meta)})")
    _check_plain(meta, "meta")

    entries = obj["tensors"]
    if not isinstance(entries, list):
        raise CodecError(f"envelope tensors is not a list (got {_describe(entries)})")
    names: list[str] = []
    arrays: list[np.ndarray] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        name, array = tensor(index, entry)
        if name in seen:
            raise CodecError(f"duplicate tensor name {name!r}")
        seen.add(name)
        names.append(name)
        arrays.append(array)
    return Envelope(kind=kind, meta=meta, names=names, tensors=arrays)


def digest(payload: bytes | bytearray | memoryview) -> str:
    """Hex BLAKE3 (256 bits) of the payload bytes: what identifies an update in the audit
    trail and the client's push log, and each part of a model sent in parts. Every update is
    hashed by its client and again by the aggregator; BLAKE3 (in C, SIMD) takes about a quarter
    of SHA-256's time for the same bytes here, and lets go of the interpreter's lock."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CodecError(f"payload must be bytes, got {type(payload).__name__}")
    return blake3(payload).hexdigest()


def pack_obj(obj: Any) -> bytes:
    """Pack a small plain object (e.g. a metadata dict) as msgpack."""
    _check_plain(obj, "object")
    try:
        packed: bytes = msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"could not pack object: {exc}") from exc
    return packed


def unpack_obj(raw: bytes) -> Any:
    """Inverse of pack_obj; any malformed input raises CodecError."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise CodecError(f"payload must be bytes, got {type(raw).__name__}")
    obj = _unpack(raw, "payload")
    _check_plain(obj, "object")
    return obj
