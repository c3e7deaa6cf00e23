"""Lossy encodings of model deltas (pure numpy; no Redis, no Keras, no wire format).

A client sends ``delta = local weights - global weights`` instead of its weights, encoded as

- ``float16``: every value rounded to half precision (2 bytes), after multiplying the tensor by
  a power of two that puts its largest magnitude in [2**14, 2**15), the top of float16's range;
  the float32 scale (that power of two, inverted) travels with it. Scaling by a power of two is
  exact, so each value is off by at most 2**-11 of itself, down to 2**-29 of the tensor's
  largest value. Why scale: training deltas are often small (1e-6..1e-3), and float16's normal range
  starts at 6.1e-5; below it values become subnormal, which keep fewer significant bits and
  which NumPy converts about 40 times slower. Large deltas (above 65,504) no longer overflow.
- ``int8``: symmetric 8-bit quantisation with one float32 scale per block of ``block``
  consecutive values (flattened, C order): ``scale = max|x| / 127`` over the block,
  ``q = round(x / scale)``, decoded as ``q * scale``, so each value is off by at most
  ``scale / 2``.

Why blocks: a single scale per tensor is set by its largest value, so one outlier (a bias
that moved a lot, a few hot embedding rows) makes the step coarse for every other value of
the tensor, and small deltas round to zero. With a scale per 4,096 values an outlier only
coarsens its own block, for 4 bytes of scale per 4,096 (0.1 % on top of the 1 byte per
value). Symmetric rather than affine (min/max with a zero point): deltas are centred on zero,
where the affine step would be almost the same, and exact zeros stay exact.

Work is done in chunks of whole blocks, so temporaries stay a few MiB (cache-sized) whatever
the model size, and every chunk is a handful of vectorised numpy calls.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from fedq.protocol import vocabulary

ENCODINGS: tuple[str, ...] = vocabulary.ENCODINGS
DEFAULT_BLOCK: int = 4096
MAX_BLOCK: int = 1 << 20
INT8_LEVELS: int = 127  # symmetric: codes -127..127, so +x and -x quantise alike
FLOAT16_TOP_EXPONENT: int = 15  # scaled float16 values stay below 2**15 (float16 holds 65,504)
_CHUNK_VALUES: int = 1 << 20  # values per chunk of work (4 MiB of float32)


class CompressionError(ValueError):
    """A tensor cannot be encoded (it holds NaN or infinity)."""


def num_blocks(size: int, block: int) -> int:
    """Blocks (hence int8 scales) of a tensor of ``size`` values."""
    return -(-int(size) // int(block))


def _check_block(block: int) -> int:
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or not 1 <= block <= MAX_BLOCK:
        raise ValueError(f"block size must be an integer in 1..{MAX_BLOCK}, got {block!r}")
    return int(block)


def _chunks(n: int, block: int) -> Iterator[tuple[int, int, int, int]]:
    """(start, stop, first block, last block + 1) of consecutive runs of whole blocks."""
    step = max(1, _CHUNK_VALUES // block) * block
    for start in range(0, n, step):
        stop = min(n, start + step)
        yield start, stop, start // block, num_blocks(stop, block)


def _as_blocks(flat: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Views of a 1-d chunk: its whole blocks as (k, block), and the short last block (1, r) or None."""
    full = flat.size // block
    head = flat[: full * block].reshape(full, block)
    tail = flat[full * block:].reshape(1, -1) if flat.size % block else None
    return head, tail


def quantize_int8(x: np.ndarray, block: int = DEFAULT_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(codes int8 of x's shape, scales float32 of num_blocks(x.size)); CompressionError if x is not finite."""
    block = _check_block(block)
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    codes = np.empty(flat.size, dtype=np.int8)
    scales = np.empty(num_blocks(flat.size, block), dtype=np.float32)
    for start, stop, b0, b1 in _chunks(flat.size, block):
        src, dst, sc = flat[start:stop], codes[start:stop], scales[b0:b1]
        done = 0
        for piece_src, piece_dst in zip(_as_blocks(src, block), _as_blocks(dst, block)):
            if piece_src is None or piece_dst is None or piece_src.size == 0:  # src and dst: same sizes
                continue
            k = piece_src.shape[0]
            # max |x| without an |x| temporary: the larger of max and -min.
            amax = np.maximum(piece_src.max(axis=1), -piece_src.min(axis=1))
            if not np.isfinite(amax).all():
                raise CompressionError("tensor contains NaN or infinity")
            scale = amax / np.float32(INT8_LEVELS)
            sc[done:done + k] = scale
            done += k
            safe = np.where(scale > 0, scale, np.float32(1.0))  # an all-zero block: codes 0, scale 0
            tmp = piece_src / safe[:, None]
            np.rint(tmp, out=tmp)
            np.clip(tmp, -INT8_LEVELS, INT8_LEVELS, out=tmp)
            piece_dst[...] = tmp
    return codes.reshape(np.shape(x)), scales


def dequantize_int8(codes: np.ndarray, scales: np.ndarray, block: int = DEFAULT_BLOCK,
                    base: np.ndarray | None = None) -> np.ndarray:
    """float32 ``codes * scale`` per block (plus ``base``, added in the same pass, when given)."""
    block = _check_block(block)
    flat = np.ascontiguousarray(codes).reshape(-1)
    if scales.shape != (num_blocks(flat.size, block),):
        raise ValueError(f"{scales.size} scales for {flat.size} values in blocks of {block}, "
                         f"expected {num_blocks(flat.size, block)}")
    out = np.empty(flat.size, dtype=np.float32)
    base_flat = None if base is None else np.ascontiguousarray(base, dtype=np.float32).reshape(-1)
    sc32 = scales.astype(np.float32, copy=False)
    for start, stop, b0, b1 in _chunks(flat.size, block):
        sc = sc32[b0:b1]
        done = 0
        for piece_q, piece_out in zip(_as_blocks(flat[start:stop], block), _as_blocks(out[start:stop], block)):
            if piece_q is None or piece_q.size == 0:
                continue
            k = piece_q.shape[0]
            np.multiply(piece_q, sc[done:done + k, None], out=piece_out)
            done += k
        if base_flat is not None:
            out[start:stop] += base_flat[start:stop]
    return out.reshape(np.shape(codes))


def _max_abs(x: np.ndarray) -> float:
    """max |x| from two reductions (no |x| temporary); CompressionError when x is not finite."""
    if x.size == 0:
        return 0.0
    top = max(float(x.max()), -float(x.min()))
    if not np.isfinite(top):
        raise CompressionError("tensor contains NaN or infinity")
    return top


def to_float16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float16 values, float32 scale of shape (1,)): x ~= values * scale, scale a power of two."""
    x = np.asarray(x, dtype=np.float32)
    top = _max_abs(x)
    # top = m * 2**e with 0.5 <= m < 1, so top * 2**(15 - e) lies in [2**14, 2**15). Clamped so
    # that the power of two and its inverse are normal float32 numbers.
    shift = FLOAT16_TOP_EXPONENT - int(np.frexp(np.float32(top))[1]) if top > 0 else 0
    shift = min(126, max(-126, shift))
    half = np.empty(x.shape, dtype=np.float16)
    # Computed in float32 and rounded to float16 on the way out: no float32 temporary.
    np.multiply(x, np.float32(2.0 ** shift), out=half, casting="same_kind")
    return half, np.array([2.0 ** -shift], dtype=np.float32)


def from_float16(half: np.ndarray, scale: np.ndarray, base: np.ndarray | None = None) -> np.ndarray:
    """float32 ``half * scale`` (plus ``base`` when given)."""
    out: np.ndarray = np.multiply(half, scale.astype(np.float32, copy=False).reshape(()), dtype=np.float32)
    if base is not None:
        out += base
    return out


def encode(delta: np.ndarray, encoding: str, block: int = DEFAULT_BLOCK) -> list[np.ndarray]:
    """The arrays that carry ``delta``: [values, scales], float16 and one scale, or int8 and a scale per block."""
    if encoding == "float16":
        return list(to_float16(delta))
    if encoding == "int8":
        return list(quantize_int8(delta, block))
    raise ValueError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS[1:])}")


def decode(parts: Sequence[np.ndarray], encoding: str, block: int = DEFAULT_BLOCK,
           base: np.ndarray | None = None) -> np.ndarray:
    """float32 delta from the arrays of ``encode`` (base + delta when ``base`` is given)."""
    if encoding == "float16":
        return from_float16(parts[0], parts[1], base)
    if encoding == "int8":
        return dequantize_int8(parts[0], parts[1], block, base)
    raise ValueError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS[1:])}")


def squared_norms(decoded: np.ndarray, original: np.ndarray) -> tuple[float, float]:
    """(||decoded - original||^2, ||original||^2) in float32 per chunk of 1M values, summed in float64."""
    d = np.ascontiguousarray(decoded, dtype=np.float32).reshape(-1)
    o = np.ascontiguousarray(original, dtype=np.float32).reshape(-1)
    err = ref = 0.0
    for start in range(0, o.size, _CHUNK_VALUES):
        oc = o[start:start + _CHUNK_VALUES]
        diff = d[start:start + _CHUNK_VALUES] - oc
        # float32 dot products: a few times faster than float64, and a reported error needs
        # three significant digits, not seven.
        err += float(np.dot(diff, diff))
        ref += float(np.dot(oc, oc))
    return err, ref


def error_terms(parts: Sequence[np.ndarray], encoding: str, block: int, original: np.ndarray) -> tuple[float, float]:
    """squared_norms(decode(parts), original), decoding a chunk at a time (no model-sized temporary)."""
    o = np.ascontiguousarray(original, dtype=np.float32).reshape(-1)
    flat = np.ascontiguousarray(parts[0]).reshape(-1)
    err = ref = 0.0
    for start, stop, b0, b1 in _chunks(o.size, block if encoding == "int8" else _CHUNK_VALUES):
        if encoding == "int8":
            dec = dequantize_int8(flat[start:stop], parts[1][b0:b1], block)
        else:
            dec = from_float16(flat[start:stop], parts[1])
        e, r = squared_norms(dec, o[start:stop])
        err, ref = err + e, ref + r
    return err, ref


def relative_error(decoded: Sequence[np.ndarray], original: Sequence[np.ndarray]) -> float:
    """||decoded - original|| / ||original|| over all tensors together (0 when original is all zero)."""
    err = ref = 0.0
    for d, o in zip(decoded, original, strict=True):
        e, r = squared_norms(d, o)
        err += e
        ref += r
    if ref == 0.0:
        return 0.0 if err == 0.0 else float("inf")
    return float(np.sqrt(err / ref))
