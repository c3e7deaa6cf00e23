"""Moving models through Redis, whole or in parts (see fedq.protocol.chunking for the format).

A model larger than the chunk size (``FEDQ_CHUNK_BYTES``) goes as parts, each its own key,
and a head that lists their digests: the client writes its parts under its own keys and then
pushes the head (the push is what the aggregator sees); the aggregator writes the global
model's parts and then commits the head. Readers fetch parts one at a time.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from fedq.errors import CodecError, UpdateRejected
from fedq.protocol import chunking, messages
from fedq.protocol.replies import as_bytes
from fedq.protocol.signing import Signer
from fedq.protocol.store import RunStore

PART_OVERHEAD = 4096  # a part's envelope around its values: far more than it needs


class PartsGone(CodecError):
    """A global model's parts were deleted while being read (two commits went by)."""


@dataclass(frozen=True)
class Pushed:
    """What a push sent: its outcome and the bytes that travelled (head and parts)."""

    outcome: str
    nbytes: int
    parts: int


def push_update(st: RunStore, client_id: str, round_no: int, num_examples: int, metrics: Mapping[str, float],
                names: Sequence[str], tensors: Sequence[np.ndarray], *, chunk_bytes: int, max_bytes: int,
                signer: Signer | None = None, compression: Mapping[str, Any] | None = None,
                window: int = 0) -> Pushed:
    """Encode, sign and push one update; returns the outcome. names/tensors are what travels: the
    weights, or with compression (its descriptor, fedq.protocol.messages.compress_update) the
    encoded delta, which always travels whole. float32 weights larger than chunk_bytes travel
    in parts. window: versions the round may lag the newest (buffered aggregation; see RunStore.push_update)."""
    if compression is not None or not chunking.should_chunk(tensors, chunk_bytes):
        signature = None if signer is None else signer.sign(st.run_id, round_no, client_id, num_examples,
                                                            names, tensors, compression)
        payload = messages.encode_update(st.run_id, round_no, client_id, num_examples, metrics, names,
                                         tensors, signature, compression)
        return Pushed(st.push_update(client_id, round_no, payload, max_bytes, window=window), len(payload), 0)
    total = sum(t.nbytes for t in tensors)
    if total > max_bytes:
        return Pushed(st.refuse_push(client_id, round_no, "too_large",
                                     f"{total} bytes exceeds the cap of {max_bytes} (FEDQ_MAX_UPDATE_BYTES)"), 0, 0)
    push_id = secrets.token_hex(6)  # parts of different pushes never mix, even mid-read
    digests, sent = [], 0
    for index, (payload, digest) in enumerate(chunking.encode_parts(tensors, chunk_bytes)):
        st.put_part(st.k.update_part(client_id, round_no, push_id, index), payload)
        digests.append(digest)
        sent += len(payload)
    layout = chunking.layout_of(tensors, chunk_bytes, digests)
    shapes = [tuple(t.shape) for t in tensors]
    signature = None if signer is None else signer.sign_digest(
        st.run_id, round_no, client_id, num_examples, messages.parts_digest(names, shapes, layout))
    head = messages.encode_update_head(st.run_id, round_no, client_id, num_examples, metrics, names, shapes,
                                       layout, push_id, signature)
    previous = st.part_id(client_id, round_no)
    outcome = st.push_update(client_id, round_no, head, max_bytes, window=window)
    if outcome == "ok" and previous and previous != push_id:
        st.drop_parts(st.k.update_part(client_id, round_no, previous, k) for k in range(layout.count))
    elif outcome != "ok":
        st.drop_parts(st.k.update_part(client_id, round_no, push_id, k) for k in range(layout.count))
    return Pushed(outcome, sent + len(head), layout.count)


class PartMissing(CodecError):
    """A part named by a head is not in Redis."""


def read_parts(st: RunStore, keys: Sequence[str], layout: chunking.Layout) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, values) of each part under keys, fetched one at a time and checked against the
    head's layout. PartMissing when one is gone, CodecError when one does not match."""
    itemsize = np.dtype(layout.dtype).itemsize
    for index, key in enumerate(keys):
        offset, length = layout.span(index)
        # Its size first: a client may store anything under its own keys, and reading a bogus
        # 512 MB value to find that its digest is wrong would break the memory bound.
        try:
            size, most = st.r.strlen(key), length * itemsize + PART_OVERHEAD
        except redis.ResponseError:  # the client's own key, of another type
            raise CodecError(f"part {index} is not a string") from None
        if size > most:
            raise CodecError(f"part {index} is {size} bytes, at most {most} expected")
        payload = as_bytes(st.r.get(key)) if size else None
        if payload is None:
            raise PartMissing(f"part {index} of {layout.count} is missing")
        yield offset, chunking.decode_part(payload, layout, index)


def fold_parts(st: RunStore, upd: messages.Update, fold: Callable[[int, np.ndarray], None]) -> None:
    """Fetch an update's parts one by one, check each against its head and hand it to fold
    (offset, values). UpdateRejected('bad_part') when one is missing or does not match."""
    assert upd.layout is not None and upd.part_id is not None
    try:
        for offset, values in read_parts(st, update_part_keys(st, upd), upd.layout):
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                raise UpdateRejected("non_finite", f"the part at {offset} contains NaN or infinity")
            fold(offset, values)
    except CodecError as exc:
        raise UpdateRejected("bad_part", str(exc)) from None


def update_part_keys(st: RunStore, upd: messages.Update) -> list[str]:
    """The keys of an update's parts (none when it travelled whole)."""
    if upd.layout is None or upd.part_id is None:
        return []
    return [st.k.update_part(upd.client_id, upd.round, upd.part_id, k) for k in range(upd.layout.count)]


def assemble(st: RunStore, upd: messages.Update, template: Sequence[messages.TensorSpec],
             on_part: Callable[[], None] | None = None) -> list[np.ndarray]:
    """An update sent in parts, put back together (strategies that need whole updates);
    on_part is called before each part is put in place."""
    writer = chunking.FlatWriter([s.shape for s in template], template[0].dtype)

    def put(offset: int, values: np.ndarray) -> None:
        if on_part is not None:
            on_part()
        writer.put(offset, values)

    fold_parts(st, upd, put)
    return writer.tensors


def encode_global(st: RunStore, round_no: int, names: Sequence[str], tensors: Sequence[np.ndarray],
                  chunk_bytes: int, on_part: Callable[[], None] | None = None) -> tuple[bytes, list[str]]:
    """The global model's head (or whole envelope), writing its parts first when it has any;
    returns (payload to commit, keys of the parts written). on_part is called before each part
    (the aggregator renews its lease there)."""
    if not chunking.should_chunk(tensors, chunk_bytes):
        return messages.encode_global(st.run_id, round_no, names, tensors), []
    digests, written = _write_global_parts(st, round_no, chunking.encode_parts(tensors, chunk_bytes), on_part)
    layout = chunking.layout_of(tensors, chunk_bytes, digests)
    head = messages.encode_global_head(st.run_id, round_no, names, [tuple(t.shape) for t in tensors], layout)
    return head, written


def encode_global_from(st: RunStore, round_no: int, template: Sequence[messages.TensorSpec],
                       read: Callable[[int, int], np.ndarray], chunk_bytes: int,
                       on_part: Callable[[], None] | None = None) -> tuple[bytes, list[str]]:
    """Like encode_global, for a global model read slice by slice (read(offset, length) of its
    flat parameters) and never held whole: its parts are made and written one at a time."""
    if not chunking.should_chunk(template, chunk_bytes):
        raise ValueError("encode_global_from is for models that travel in parts (chunking.should_chunk)")
    names, shapes = [t.name for t in template], [t.shape for t in template]
    dtype = template[0].dtype
    elements = sum(math.prod(s) for s in shapes)
    parts = chunking.encode_parts_from(read, elements, dtype, chunk_bytes)
    digests, written = _write_global_parts(st, round_no, parts, on_part)
    layout = chunking.layout_for(elements, dtype, chunk_bytes, digests)
    return messages.encode_global_head(st.run_id, round_no, names, shapes, layout), written


def _write_global_parts(st: RunStore, round_no: int, parts: Iterator[tuple[bytes, str]],
                        on_part: Callable[[], None] | None) -> tuple[list[str], list[str]]:
    """Write a global model's parts as they are made; (their digests, their keys)."""
    digests, written = [], []
    for index, (payload, digest) in enumerate(parts):
        if on_part is not None:
            on_part()
        key = st.k.global_part(round_no, index)
        st.put_part(key, payload)
        digests.append(digest)
        written.append(key)
    return digests, written


def global_template(st: RunStore) -> tuple[int, list[messages.TensorSpec]]:
    """(round, tensor specs) of the run's global model, from its head alone: no part is read."""
    payload = st.global_payload()
    if payload is None:
        raise CodecError(f"run {st.run_id} has no global model")
    round_no, names, tensors, head = messages.decode_global_any(payload, st.run_id)
    if head is None:
        return round_no, messages.template_of(names, tensors)
    shapes, layout = head
    return round_no, [messages.TensorSpec(n, layout.dtype, tuple(s)) for n, s in zip(names, shapes)]


def read_global(st: RunStore, payload: bytes | None = None) -> tuple[int, list[str], list[np.ndarray]]:
    """(round, names, tensors) of the run's global model, fetching its parts when it has any."""
    payload = st.global_payload() if payload is None else payload
    if payload is None:
        raise CodecError(f"run {st.run_id} has no global model")
    round_no, names, tensors, head = messages.decode_global_any(payload, st.run_id)
    if head is None:
        return round_no, names, tensors
    shapes, layout = head
    writer = chunking.FlatWriter(shapes, layout.dtype)
    try:
        for offset, values in read_parts(st, [st.k.global_part(round_no, k) for k in range(layout.count)], layout):
            writer.put(offset, values)
    except PartMissing as exc:
        # Parts live two rounds: a reader this far behind starts over from the new head.
        raise PartsGone(f"round {round_no}'s global model: {exc}") from None
    return round_no, names, writer.tensors


