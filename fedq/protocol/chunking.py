"""Chunked transport: a model too large for one Redis value travels as a head and parts.

A model's tensors, taken in order and flattened, form one vector of parameters. A *part* is a
contiguous slice of that vector, at most ``chunk_bytes`` long, sent as its own codec envelope
(kind ``part``: one 1-D tensor, its offset in meta). The *head* is the usual update or global
envelope with no tensors and a ``parts`` record in meta: how many parts, how many parameters,
their dtype, and the BLAKE3 digest of every part. A reader fetches the parts one by one, checks each
against the head, and folds it (the aggregator) or copies it into place (a client), so neither
side holds more than the model it needs plus one part.

Pure: no Redis here; the store names the keys and the aggregator drives the loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedq.errors import CodecError
from fedq.protocol import codec

KIND_PART = "part"
MIN_CHUNK_BYTES = 1024  # smaller parts would only multiply round trips
MAX_PARTS = 100_000  # bounds the head's digest list (a 10 TB model at 100 MB a part)


def _positive_int(raw: dict[str, Any], name: str) -> int:
    """raw[name] as a positive int; CodecError naming parts.<name> otherwise."""
    v = raw.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise CodecError(f"parts.{name} must be a positive integer, got {v!r}")
    return v


@dataclass(frozen=True)
class Layout:
    """How a model's parameters are cut into parts (what the head's ``parts`` meta says)."""

    count: int
    elements: int
    dtype: str  # little-endian numpy dtype string of every tensor, e.g. '<f4'
    part_elements: int
    digests: tuple[str, ...]

    def to_meta(self) -> dict[str, Any]:
        return {"count": self.count, "elements": self.elements, "dtype": self.dtype,
                "part_elements": self.part_elements, "digests": list(self.digests)}

    @classmethod
    def from_meta(cls, raw: Any, *, elements: int, dtype: str) -> Layout:
        """Check a head's ``parts`` record against the model it claims to carry."""
        if not isinstance(raw, dict):
            raise CodecError("parts must be a map")
        count, got, per = (_positive_int(raw, name) for name in ("count", "elements", "part_elements"))
        dt, digests = raw.get("dtype"), raw.get("digests")
        if got != elements:
            raise CodecError(f"parts carry {got} parameters, the model has {elements}")
        if dt != dtype:
            raise CodecError(f"parts are {dt!r}, the model is {dtype!r}")
        if count > MAX_PARTS or count != -(-elements // per):
            raise CodecError(f"{count} parts of {per} parameters cannot carry {elements}")
        if (not isinstance(digests, list) or len(digests) != count
                or not all(isinstance(d, str) and len(d) == 64 for d in digests)):
            raise CodecError(f"parts.digests must be {count} hex digests (BLAKE3, 64 characters)")
        return cls(count, elements, dtype, per, tuple(digests))

    def span(self, index: int) -> tuple[int, int]:
        """(offset, length) of part ``index`` in the flat parameter vector."""
        start = index * self.part_elements
        return start, min(self.part_elements, self.elements - start)


def uniform_dtype(tensors: Sequence[Any]) -> str | None:
    """The little-endian dtype shared by every tensor, or None when they differ (then the model
    travels whole)."""
    kinds = {np.dtype(t.dtype).newbyteorder("<").str for t in tensors}
    return kinds.pop() if len(kinds) == 1 else None


def model_bytes(tensors: Sequence[Any]) -> int:
    """Bytes of a model's tensors: arrays, or anything with their shape and dtype (the
    protocol's TensorSpecs)."""
    return sum(math.prod(t.shape) * np.dtype(t.dtype).itemsize for t in tensors)


def should_chunk(tensors: Sequence[Any], chunk_bytes: int) -> bool:
    """Whether a model is sent in parts: larger than one chunk, and of a single dtype (tensors:
    as model_bytes takes them)."""
    return chunk_bytes > 0 and model_bytes(tensors) > chunk_bytes and uniform_dtype(tensors) is not None


def part_elements(itemsize: int, chunk_bytes: int) -> int:
    return max(MIN_CHUNK_BYTES, chunk_bytes) // itemsize


def iter_slices(tensors: Sequence[np.ndarray], per: int) -> Iterator[np.ndarray]:
    """The flat parameter vector in slices of ``per`` elements; only a slice that spans two
    tensors is copied, the others are views."""
    flats = [np.ascontiguousarray(t).reshape(-1) for t in tensors]
    pending: list[np.ndarray] = []
    have = 0
    for flat in flats:
        pos = 0
        while pos < flat.size:
            take = min(per - have, flat.size - pos)
            pending.append(flat[pos:pos + take])
            have += take
            pos += take
            if have == per:
                yield pending[0] if len(pending) == 1 else np.concatenate(pending)
                pending, have = [], 0
    if have:
        yield pending[0] if len(pending) == 1 else np.concatenate(pending)


def encode_parts(tensors: Sequence[np.ndarray], chunk_bytes: int) -> Iterator[tuple[bytes, str]]:
    """(part payload, its digest: codec.digest) for each part, made one at a time."""
    dtype = uniform_dtype(tensors)
    if dtype is None:
        raise CodecError("a model with tensors of different dtypes cannot be sent in parts")
    per = part_elements(np.dtype(dtype).itemsize, chunk_bytes)
    for index, piece in enumerate(iter_slices(tensors, per)):
        yield _part(index, index * per, piece)


def encode_parts_from(read: Callable[[int, int], np.ndarray], elements: int, dtype: str,
                      chunk_bytes: int) -> Iterator[tuple[bytes, str]]:
    """Like encode_parts, for a model that is never whole in memory: read(offset, length)
    gives each slice of its flat parameter vector as the part is made."""
    per = part_elements(np.dtype(dtype).itemsize, chunk_bytes)
    for index, offset in enumerate(range(0, elements, per)):
        piece = read(offset, min(per, elements - offset))
        if piece.dtype.newbyteorder("<").str != dtype:
            raise CodecError(f"slice at {offset} is {piece.dtype.str}, the model is {dtype}")
        yield _part(index, offset, piece)


def _part(index: int, offset: int, piece: np.ndarray) -> tuple[bytes, str]:
    payload = codec.encode(KIND_PART, [piece], meta={"index": index, "offset": offset}, names=["flat"])
    return payload, codec.digest(payload)


def layout_of(tensors: Sequence[np.ndarray], chunk_bytes: int, digests: Sequence[str]) -> Layout:
    """The head's record of a model sent by encode_parts with these digests."""
    dtype = uniform_dtype(tensors)
    assert dtype is not None
    return layout_for(int(sum(t.size for t in tensors)), dtype, chunk_bytes, digests)


def layout_for(elements: int, dtype: str, chunk_bytes: int, digests: Sequence[str]) -> Layout:
    """The head's record of a model of ``elements`` parameters of ``dtype`` sent in parts."""
    return Layout(len(digests), elements, dtype, part_elements(np.dtype(dtype).itemsize, chunk_bytes), tuple(digests))


def decode_part(payload: bytes, layout: Layout, index: int) -> np.ndarray:
    """The slice a part carries, after checking it against the head; CodecError otherwise."""
    if codec.digest(payload) != layout.digests[index]:
        raise CodecError(f"part {index} does not match its digest in the head")
    env = codec.decode(payload, expect_kind=KIND_PART)
    offset, length = layout.span(index)
    if env.meta.get("index") != index or env.meta.get("offset") != offset or len(env.tensors) != 1:
        raise CodecError(f"part {index} is not the slice at offset {offset}")
    flat = env.tensors[0]
    if flat.dtype.str != layout.dtype or flat.shape != (length,):
        raise CodecError(f"part {index} holds {flat.dtype.str}{list(flat.shape)}, expected {layout.dtype}[{length}]")
    return flat


class FlatWriter:
    """Writes parts into place in a list of tensors (a client assembling a global model)."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], dtype: str) -> None:
        self.tensors = [np.empty(s, dtype=np.dtype(dtype)) for s in shapes]
        self._flats = [t.reshape(-1) for t in self.tensors]
        self._starts = np.cumsum([0] + [f.size for f in self._flats])

    def put(self, offset: int, values: np.ndarray) -> None:
        for i, part in slices_at(self._starts, offset, values.size):
            lo, hi, src = part
            self._flats[i][lo:hi] = values[src:src + hi - lo]


def slices_at(starts: np.ndarray, offset: int, length: int) -> Iterator[tuple[int, tuple[int, int, int]]]:
    """For a flat range [offset, offset+length): (tensor index, (start, stop, source offset))
    of each tensor it covers, given the tensors' cumulative start offsets."""
    end = offset + length
    i = int(np.searchsorted(starts, offset, side="right")) - 1
    while offset < end and i < len(starts) - 1:
        lo = offset - int(starts[i])
        hi = min(end, int(starts[i + 1])) - int(starts[i])
        if hi > lo:
            yield i, (lo, hi, offset - (end - length))
        offset = int(starts[i]) + hi
        i += 1
