"""Messages of the round protocol: building and validating payloads (pure; no Redis, no Keras)."""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from fedq.errors import CodecError, UpdateRejected
from fedq.protocol import codec, compress
from fedq.protocol.chunking import Layout

KIND_GLOBAL = "global"
KIND_UPDATE = "update"
KIND_SCALER = "scaler"
MAX_METRICS = 64
SCALES_SUFFIX = "#scales"  # name of a tensor's scales on the wire: <tensor name>#scales


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape that every update's tensor must have."""

    name: str
    dtype: str
    shape: tuple[int, ...]


def template_of(names: Sequence[str], tensors: Sequence[np.ndarray]) -> list[TensorSpec]:
    """The TensorSpecs of a model's weights (from the global model)."""
    return [TensorSpec(n, np.dtype(t.dtype).newbyteorder("<").str, tuple(t.shape))
            for n, t in zip(names, tensors)]


@dataclass(frozen=True)
class Update:
    """A validated client update."""

    client_id: str
    round: int
    num_examples: int
    metrics: dict[str, float]
    tensors: list[np.ndarray]
    digest: str
    signature: bytes | None = None
    names: list[str] | None = None
    # A compressed update: ``tensors``/``names`` are the reconstructed weights (global + delta),
    # ``wire_*`` what travelled (and what the signature covers), ``compression`` its descriptor.
    wire_names: list[str] | None = None
    wire_tensors: list[np.ndarray] | None = None
    compression: dict[str, Any] | None = None
    payload_bytes: int = 0  # the whole envelope
    tensor_bytes: int = 0  # the tensors in it (int8 codes and scales, float16 or float32 values)

    # An update sent in parts: its layout and push id (tensors is then empty; the aggregator
    # fetches the parts, see fedq.protocol.transfer).
    layout: Layout | None = None
    part_id: str | None = None

    @property
    def encoding(self) -> str:
        return "none" if self.compression is None else str(self.compression["encoding"])


@dataclass(frozen=True)
class Compressed:
    """A client's weights as a compressed delta, ready to sign and encode."""

    names: list[str]
    tensors: list[np.ndarray]
    descriptor: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)


_PUSH_ID = re.compile(r"^[0-9a-f]{4,32}$")


def parts_digest(names: Sequence[str], shapes: Sequence[Sequence[int]], layout: Layout) -> bytes:
    """What a signature over an update sent in parts covers: the tensors' names and shapes and
    the digest of every part (each part's bytes are checked against its digest on arrival)."""
    return hashlib.sha256(msgpack.packb(["fedq-parts-v1", list(names), [list(s) for s in shapes],
                                         layout.to_meta()])).digest()


def _model_meta(names: Sequence[str], shapes: Sequence[Sequence[int]], layout: Layout) -> dict[str, Any]:
    return {"names": list(names), "shapes": [list(s) for s in shapes], **layout.to_meta()}


def encode_update_head(run_id: str, round_no: int, client_id: str, num_examples: int,
                       metrics: Mapping[str, float], names: Sequence[str], shapes: Sequence[Sequence[int]],
                       layout: Layout, push_id: str, signature: bytes | None = None) -> bytes:
    """Head of an update sent in parts: the usual meta, no tensors, and the parts' record."""
    meta: dict[str, Any] = {"run": run_id, "round": int(round_no), "client": client_id,
                            "num_examples": int(num_examples), "metrics": {k: float(v) for k, v in metrics.items()},
                            "parts": {"id": push_id, **_model_meta(names, shapes, layout)}}
    if signature is not None:
        meta["sig"] = signature
    return codec.encode(KIND_UPDATE, [], meta=meta, names=[])


def encode_global_head(run_id: str, round_no: int, names: Sequence[str], shapes: Sequence[Sequence[int]],
                       layout: Layout) -> bytes:
    """Head of a global model sent in parts."""
    return codec.encode(KIND_GLOBAL, [], meta={"run": run_id, "round": int(round_no),
                                               "parts": _model_meta(names, shapes, layout)}, names=[])


def encode_global(run_id: str, round_no: int, names: Sequence[str],
                  tensors: Sequence[np.ndarray]) -> bytes:
    """Envelope of the global model after ``round_no`` committed rounds (0 = initial)."""
    return codec.encode(KIND_GLOBAL, tensors, meta={"run": run_id, "round": int(round_no)}, names=names)


def encode_update(run_id: str, round_no: int, client_id: str, num_examples: int,
                  metrics: Mapping[str, float], names: Sequence[str],
                  tensors: Sequence[np.ndarray], signature: bytes | None = None,
                  compression: Mapping[str, Any] | None = None) -> bytes:
    """Envelope of one client's update for ``round_no`` (with its signature when signed).

    With ``compression`` (a ``Compressed.descriptor``), names and tensors are the compressed
    delta's (``compress_update``), and the descriptor travels as meta["compression"]."""
    meta: dict[str, Any] = {"run": run_id, "round": int(round_no), "client": client_id,
                            "num_examples": int(num_examples),
                            "metrics": {k: float(v) for k, v in metrics.items()}}
    if signature is not None:
        meta["sig"] = signature
    if compression is not None:
        meta["compression"] = dict(compression)
    return codec.encode(KIND_UPDATE, tensors, meta=meta, names=names)


def _compressible(dtype: np.dtype | str) -> bool:
    """Float tensors travel as compressed deltas; any other dtype (counters, seeds) as it is."""
    return np.dtype(dtype).kind == "f"


def compress_update(names: Sequence[str], weights: Sequence[np.ndarray], base: Sequence[np.ndarray],
                    encoding: str, block: int = compress.DEFAULT_BLOCK) -> Compressed:
    """``weights - base`` (the global model trained from) encoded as ``encoding``, with what it costs.

    Wire layout: one tensor per model tensor, in model order and under its name (float16 values
    or int8 codes; non-float tensors unchanged), then the float32 scales of each float tensor,
    named ``<name>#scales`` (float16: one; int8: one per block). metrics: compression_error
    (relative L2 error of the decoded delta over the whole model), compression_bytes (tensor
    bytes sent), compression_bytes_saved (against float32 weights) and compression_seconds
    (encoding plus the error measurement).

    Raises compress.CompressionError when a delta cannot be encoded (NaN or infinity); the
    caller can send the weights uncompressed instead (and have them refused as non-finite)."""
    if encoding not in compress.ENCODINGS[1:]:
        raise ValueError(f"unknown encoding {encoding!r}; choose one of {', '.join(compress.ENCODINGS[1:])}")
    t0 = time.perf_counter()
    data: list[np.ndarray] = []
    scale_names: list[str] = []
    scales: list[np.ndarray] = []
    err = ref = 0.0
    raw_bytes = 0
    for name, w, g in zip(names, weights, base, strict=True):
        w = np.asarray(w)
        raw_bytes += w.nbytes
        if not _compressible(w.dtype):
            data.append(w)
            continue
        delta = np.subtract(w, g, dtype=np.result_type(w.dtype, np.float32))
        parts = compress.encode(delta, encoding, block)
        e, r = compress.error_terms(parts, encoding, block, delta)
        err, ref = err + e, ref + r
        data.append(parts[0])
        scale_names.append(name + SCALES_SUFFIX)
        scales.append(parts[1])
    tensors = data + scales
    wire_bytes = sum(t.nbytes for t in tensors)
    descriptor: dict[str, Any] = {"encoding": encoding}
    if encoding == "int8":
        descriptor["block"] = int(block)
    metrics = {"compression_error": 0.0 if ref == 0.0 else math.sqrt(err / ref),
               "compression_bytes": float(wire_bytes),
               "compression_bytes_saved": float(raw_bytes - wire_bytes),
               "compression_seconds": time.perf_counter() - t0}
    return Compressed(list(names) + scale_names, tensors, descriptor, metrics)


def decode_global(payload: bytes, run_id: str) -> tuple[int, list[str], list[np.ndarray]]:
    """(round, names, tensors) of a whole global-model envelope; CodecError if it is not one of
    this run (a head of one sent in parts: read it with fedq.protocol.transfer.read_global)."""
    round_no, names, tensors, head = decode_global_any(payload, run_id)
    if head is not None:
        raise CodecError("global model travels in parts: read it with fedq.protocol.transfer.read_global")
    return round_no, names, tensors


def decode_global_any(payload: bytes, run_id: str) -> tuple[int, list[str], list[np.ndarray],
                                                            tuple[list[tuple[int, ...]], Layout] | None]:
    """(round, names, tensors, None) of a whole global model, or (round, names, [], (shapes,
    layout)) of a head whose parts are to be fetched."""
    env = codec.decode(payload, expect_kind=KIND_GLOBAL)
    if env.meta.get("run") != run_id:
        raise CodecError(f"global model belongs to run {env.meta.get('run')!r}, not {run_id!r}")
    round_no = env.meta.get("round")
    if not isinstance(round_no, int) or isinstance(round_no, bool) or round_no < 0:
        raise CodecError(f"global model has an invalid round {round_no!r}")
    if "parts" not in env.meta:
        return round_no, list(env.names), list(env.tensors), None
    names, shapes, layout = _parts_meta(env.meta["parts"], None)
    return round_no, names, [], (shapes, layout)


def _parts_meta(raw: Any, template: Sequence[TensorSpec] | None) -> tuple[list[str], list[tuple[int, ...]], Layout]:
    """Names, shapes and layout of a head; checked against the template when one is given."""
    if not isinstance(raw, dict):
        raise CodecError("parts must be a map")
    names, shapes = raw.get("names"), raw.get("shapes")
    if (not isinstance(names, list) or not isinstance(shapes, list) or len(names) != len(shapes) or not names
            or not all(isinstance(n, str) for n in names)
            or not all(isinstance(s, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                   for d in s) for s in shapes)):
        raise CodecError("parts must list the tensors' names and shapes")
    shapes_t = [tuple(s) for s in shapes]
    if template is not None:
        if names != [t.name for t in template] or shapes_t != [t.shape for t in template]:
            raise CodecError("the parts' tensors are not the model's (names or shapes differ)")
        dtypes = {t.dtype for t in template}
        if len(dtypes) != 1:
            raise CodecError("this model's tensors differ in dtype: it cannot travel in parts")
        dtype = dtypes.pop()
    else:
        given = raw.get("dtype")
        dtype = given if isinstance(given, str) else ""
        if dtype not in ("<f4", "<f8", "<f2"):
            raise CodecError(f"parts of dtype {dtype!r} are not supported")
    elements = sum(math.prod(s) for s in shapes_t)
    return names, shapes_t, Layout.from_meta(raw, elements=elements, dtype=dtype)


def validate_update(payload: bytes, *, run_id: str, round_no: int, client_id: str,
                    template: Sequence[TensorSpec], max_examples: int | None = None,
                    compression: str = "none", base: Sequence[np.ndarray] | None = None,
                    digest: str | None = None) -> Update:
    """Decode and check one update; raise UpdateRejected(reason, detail) on anything wrong.

    digest: the payload's (codec.digest), when the caller hashes it itself (the aggregator
    hashes on a helper thread while it folds); computed here when None.

    max_examples (the rows the client joined with) bounds the claimed sample count, so that
    one client cannot outweigh all others by claiming more data than it has.

    compression is the run's encoding: an update may come in it or uncompressed (float32
    weights are always acceptable). A compressed update is reconstructed as ``base`` (the
    round's global model, same order as template) plus its decoded delta."""
    try:
        env = codec.decode(payload, expect_kind=KIND_UPDATE)
    except CodecError as exc:
        raise UpdateRejected("undecodable", str(exc)) from None
    meta = env.meta
    if meta.get("run") != run_id:
        raise UpdateRejected("wrong_run", f"update is for run {meta.get('run')!r}, this is {run_id!r}")
    if isinstance(meta.get("round"), bool) or not isinstance(meta.get("round"), int) or meta["round"] != round_no:
        raise UpdateRejected("wrong_round", f"update is for round {meta.get('round')!r}, open round is {round_no}")
    if meta.get("client") != client_id:
        raise UpdateRejected("wrong_client",
                             f"update names client {meta.get('client')!r} but is stored under {client_id!r}")
    n = meta.get("num_examples")
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise UpdateRejected("bad_num_examples", f"sample count must be a positive integer, got {n!r}")
    if max_examples is not None and n > max_examples:
        raise UpdateRejected("bad_num_examples", f"claims {n} examples but joined with {max_examples} rows")
    metrics = _check_metrics(meta.get("metrics", {}))
    sig = meta.get("sig")
    signature = sig if isinstance(sig, bytes) else None
    digest = codec.digest(bytes(payload)) if digest is None else digest
    if "parts" in meta:
        raw = meta["parts"]
        if env.tensors:
            raise UpdateRejected("bad_parts", "a head of an update sent in parts carries no tensors")
        push_id = raw.get("id") if isinstance(raw, dict) else None
        if not isinstance(push_id, str) or not _PUSH_ID.match(push_id):
            raise UpdateRejected("bad_parts", f"invalid push id {push_id!r}")
        try:
            names, _, layout = _parts_meta(raw, template)
        except CodecError as exc:
            raise UpdateRejected("bad_parts", str(exc)) from None
        if meta.get("compression") is not None:
            raise UpdateRejected("bad_parts", "an update in parts travels uncompressed")
        return Update(client_id, round_no, n, metrics, [], digest, signature, names, layout=layout,
                      part_id=push_id, payload_bytes=len(payload))
    descriptor = _check_descriptor(meta.get("compression"), compression)
    if descriptor is None:
        _check_tensors(env.names, env.tensors, template)
        return Update(client_id, round_no, n, metrics, list(env.tensors), digest, signature, list(env.names),
                      payload_bytes=len(payload), tensor_bytes=sum(t.nbytes for t in env.tensors))
    if base is None or len(base) != len(template):
        raise ValueError("a compressed update needs the round's global model (base) to be reconstructed")
    weights = _reconstruct(env.names, env.tensors, template, descriptor, base)
    return Update(client_id, round_no, n, metrics, weights, digest, signature, [t.name for t in template],
                  wire_names=list(env.names), wire_tensors=list(env.tensors), compression=descriptor,
                  payload_bytes=len(payload), tensor_bytes=sum(t.nbytes for t in env.tensors))


def _check_descriptor(raw: Any, allowed: str) -> dict[str, Any] | None:
    """The update's compression descriptor (None: uncompressed), checked against the run's encoding."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise UpdateRejected("bad_compression", f"compression must be a map, got {type(raw).__name__}")
    encoding = raw.get("encoding")
    if encoding not in compress.ENCODINGS[1:]:
        raise UpdateRejected("bad_compression", f"unknown encoding {encoding!r} "
                             f"(known: {', '.join(compress.ENCODINGS[1:])})")
    if encoding != allowed:
        takes = "uncompressed float32 weights only" if allowed == "none" else f"{allowed} or float32 weights"
        raise UpdateRejected("bad_compression", f"update is encoded as {encoding}, this run takes {takes}")
    known = {"encoding", "block"} if encoding == "int8" else {"encoding"}
    extra = set(raw) - known
    if extra:
        raise UpdateRejected("bad_compression", f"unknown compression field(s) {sorted(map(str, extra))}")
    if encoding == "int8":
        block = raw.get("block")
        if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= compress.MAX_BLOCK:
            raise UpdateRejected("bad_compression", f"int8 block size must be an integer in "
                                 f"1..{compress.MAX_BLOCK}, got {block!r}")
    return dict(raw)


def _reconstruct(names: Sequence[str], tensors: Sequence[np.ndarray], template: Sequence[TensorSpec],
                 descriptor: Mapping[str, Any], base: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Check a compressed update's tensors against the model and return base + decoded delta."""
    encoding = descriptor["encoding"]
    block = int(descriptor.get("block", compress.DEFAULT_BLOCK))
    floats = [s for s in template if _compressible(s.dtype)]
    want = len(template) + len(floats)
    if len(tensors) != want:
        raise UpdateRejected("wrong_shape", f"{encoding} update has {len(tensors)} tensors, expected {want} "
                             f"({len(template)} tensors and {len(floats)} scales)")
    wire_dtype = {"float16": "<f2", "int8": "|i1"}[encoding]
    for name, t, spec in zip(names, tensors, template):
        if name != spec.name:
            raise UpdateRejected("wrong_shape", f"tensor {name!r} where the model has {spec.name!r}")
        expect = wire_dtype if _compressible(spec.dtype) else spec.dtype
        if t.dtype.str != expect:
            raise UpdateRejected("wrong_dtype", f"{encoding} update: tensor {name!r} is {t.dtype.name}, "
                                 f"expected {np.dtype(expect).name}")
        if tuple(t.shape) != spec.shape:
            raise UpdateRejected("wrong_shape", f"tensor {name!r} has shape {list(t.shape)}, "
                                 f"expected {list(spec.shape)}")
    scales: dict[str, np.ndarray] = {}
    for name, t, spec in zip(names[len(template):], tensors[len(template):], floats):
        label = spec.name + SCALES_SUFFIX
        if name != label:
            raise UpdateRejected("bad_scales", f"tensor {name!r} where the scales {label!r} belong")
        if t.dtype.str != "<f4":
            raise UpdateRejected("bad_scales", f"scales {name!r} are {t.dtype.name}, expected float32")
        size = math.prod(spec.shape)
        count, how = ((compress.num_blocks(size, block), f"{size} values in blocks of {block}")
                      if encoding == "int8" else (1, "float16: one per tensor"))
        if t.shape != (count,):
            raise UpdateRejected("bad_scales",
                                 f"scales {name!r} have shape {list(t.shape)}, expected [{count}] ({how})")
        if not np.isfinite(t).all():
            raise UpdateRejected("bad_scales", f"scales {name!r} contain NaN or infinity")
        if (t < 0).any():
            raise UpdateRejected("bad_scales", f"scales {name!r} contain negative values")
        scales[spec.name] = t
    out: list[np.ndarray] = []
    for t, spec, g in zip(tensors, template, base):
        if not _compressible(spec.dtype):
            out.append(t)
            continue
        w = compress.decode([t, scales[spec.name]], encoding, block, base=g).astype(spec.dtype, copy=False)
        # One check after the addition covers a float16 NaN or infinity on the wire and a
        # finite delta that overflows when added to the global model.
        if not np.isfinite(w).all():
            raise UpdateRejected("non_finite", f"tensor {spec.name!r} contains NaN or infinity "
                                 "(in its delta, or once added to the global model)")
        out.append(w)
    return out


def _check_metrics(raw: Any) -> dict[str, float]:
    if not isinstance(raw, dict) or len(raw) > MAX_METRICS:
        raise UpdateRejected("bad_metrics", f"metrics must be a map of at most {MAX_METRICS} numbers")
    out: dict[str, float] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UpdateRejected("bad_metrics", f"metric {k!r} is not a number: {v!r}")
        if not math.isfinite(v):
            raise UpdateRejected("bad_metrics", f"metric {k!r} is not finite: {v!r}")
        out[k] = float(v)
    return out


def _check_tensors(names: Sequence[str], tensors: Sequence[np.ndarray],
                   template: Sequence[TensorSpec]) -> None:
    if len(tensors) != len(template):
        raise UpdateRejected("wrong_shape", f"update has {len(tensors)} tensors, the model has {len(template)}")
    for name, t, spec in zip(names, tensors, template):
        if name != spec.name:
            raise UpdateRejected("wrong_shape", f"tensor {name!r} where the model has {spec.name!r}")
        if t.dtype.str != spec.dtype:
            raise UpdateRejected("wrong_dtype",
                                 f"tensor {name!r} is {t.dtype.name}, expected {np.dtype(spec.dtype).name}")
        if tuple(t.shape) != spec.shape:
            raise UpdateRejected("wrong_shape",
                                 f"tensor {name!r} has shape {list(t.shape)}, expected {list(spec.shape)}")
        if t.dtype.kind == "f" and not np.isfinite(t).all():
            raise UpdateRejected("non_finite", f"tensor {name!r} contains NaN or infinity")


def encode_scaler(mean: np.ndarray, std: np.ndarray, meta: Mapping[str, Any]) -> bytes:
    """Envelope of the combined standardisation statistics and the model's input facts."""
    return codec.encode(KIND_SCALER, [mean, std], meta=dict(meta), names=["mean", "std"])


def decode_scaler(payload: bytes) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(mean, std, meta) of a scaler envelope."""
    env = codec.decode(payload, expect_kind=KIND_SCALER)
    if len(env.tensors) != 2:
        raise CodecError("scaler envelope must hold exactly mean and std")
    return env.tensors[0], env.tensors[1], dict(env.meta)
