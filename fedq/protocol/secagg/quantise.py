"""Fixed point modulo 2^32 with clipping, and sample weighting as an extra coordinate.

A value ``x`` is clipped to ``[-c, c]`` and mapped to the integer ``round((x + c) * s)`` with
``s = (q - 1) / (2 c)``, in ``[0, q - 1]``. A sum of ``n`` such integers stays below 2^32 while
``n (q - 1) < 2^32`` (``SecAggParams.check``), so the sum modulo 2^32 is the exact integer sum and
``sum / s - n c`` is the sum of the quantised values. Rounding is stochastic when a generator is
given (unbiased: ``E[round(v)] = v``), to nearest otherwise.

Weighting: a client with ``m`` samples scales its update by ``w = min(m, max_weight) / max_weight``
(in ``(0, 1]``, so a clipped update stays in range) and appends ``w`` itself as the last
coordinate. The unmasked sum then carries ``sum w x`` and ``sum w``: the weighted mean, without
any count being seen alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedq.errors import SecAggError
from fedq.protocol.secagg.params import SecAggParams


def _scale(params: SecAggParams) -> float:
    return (params.quantization_range - 1) / (2.0 * params.clipping_range)


def quantise(x: np.ndarray, params: SecAggParams, rng: np.random.Generator | None = None) -> np.ndarray:
    """Clip and map float values to uint32 integers in ``[0, quantization_range - 1]``."""
    c = params.clipping_range
    v = (np.clip(np.asarray(x, dtype=np.float64), -c, c) + c) * _scale(params)
    if rng is None:
        q = np.rint(v)
    else:
        low = np.floor(v)
        q = low + (rng.random(v.shape) < (v - low))
    return np.clip(q, 0, params.quantization_range - 1).astype(np.uint32)


def dequantise_sum(total: np.ndarray, count: int, params: SecAggParams) -> np.ndarray:
    """The float sum of ``count`` clients' quantised values from their uint32 sum."""
    if np.any(total.astype(np.uint64) > count * (params.quantization_range - 1)):
        # Only a mask that did not cancel (a client masked with other secrets than it shared)
        # lands here: honest inputs cannot exceed count * (q - 1).
        raise SecAggError("sum_out_of_range",
                          f"the unmasked sum of {count} inputs exceeds {count} x (2^{params.bits} - 1): "
                          "a mask did not cancel")
    return total.astype(np.float64) / _scale(params) - count * params.clipping_range


def weight_of(num_examples: int, params: SecAggParams) -> float:
    """A client's weight: its sample count capped at ``max_weight``, over ``max_weight``."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, int | np.integer) or num_examples < 1:
        raise SecAggError("bad_count", f"sample count must be a positive integer, got {num_examples!r}")
    return min(float(num_examples), params.max_weight) / params.max_weight


def encode_input(tensors: Sequence[np.ndarray], num_examples: int, params: SecAggParams,
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """One client's plain input vector: its weighted, flattened, quantised update and its weight."""
    w = weight_of(num_examples, params)
    flat = np.concatenate([np.asarray(t, dtype=np.float64).ravel() for t in tensors] + [np.zeros(0)])
    if not np.all(np.isfinite(flat)):
        raise SecAggError("bad_update", "the update holds NaN or infinity")
    return quantise(np.append(flat * w, w), params, rng)


def decode_sum(total: np.ndarray, count: int, shapes: Sequence[tuple[int, ...]],
               params: SecAggParams) -> tuple[list[np.ndarray], float]:
    """The weighted mean of ``count`` survivors' updates (as tensors of ``shapes``) and their total weight."""
    size = sum(int(np.prod(s)) for s in shapes)
    if total.shape != (size + 1,):
        raise SecAggError("bad_length", f"the sum has {total.size} coordinates, expected {size + 1}")
    values = dequantise_sum(total, count, params)
    weight = float(values[-1])
    if weight <= 0:
        raise SecAggError("bad_weight", f"the survivors' total weight is {weight}, not positive")
    mean = values[:-1] / weight
    out, at = [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        out.append(mean[at:at + n].reshape(shape))
        at += n
    return out, weight


def encode_update(weights: Sequence[np.ndarray], base: Sequence[np.ndarray], num_examples: int,
                  params: SecAggParams, rng: np.random.Generator | None = None) -> np.ndarray:
    """A client's plain input from its trained weights: the delta from the round's global model
    ``base`` (small, so the clip bites rarely and the fixed point is fine), weighted, quantised."""
    if len(weights) != len(base) or any(np.shape(w) != np.shape(b) for w, b in zip(weights, base)):
        raise SecAggError("bad_update", "the weights do not have the global model's shapes")
    deltas = [np.asarray(w, dtype=np.float64) - np.asarray(b, dtype=np.float64) for w, b in zip(weights, base)]
    return encode_input(deltas, num_examples, params, rng)


def decode_update(total: np.ndarray, count: int, base: Sequence[np.ndarray],
                  params: SecAggParams) -> tuple[list[np.ndarray], float]:
    """The next global model from the survivors' unmasked sum: ``base`` plus their weighted mean
    delta, in the global model's dtypes; and the survivors' total weight."""
    mean, weight = decode_sum(total, count, [np.shape(b) for b in base], params)
    return [(np.asarray(b, dtype=np.float64) + m).astype(np.asarray(b).dtype) for b, m in zip(base, mean)], weight
