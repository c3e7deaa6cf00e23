"""Masking a client's input, and taking the masks out of the survivors' sum.

Client ``u`` sends ``y_u = x_u + PRG(b_u) + sum_v sign(u, v) PRG(s_uv)`` modulo 2^32, over its
neighbours ``v`` that completed the share stage, with ``sign(u, v) = +1`` if ``u < v`` and ``-1``
otherwise. Each ``y_u`` alone is uniform (the self mask ``PRG(b_u)`` is). In the sum over the
survivors ``U`` the pairwise masks between two survivors cancel; what is left is every survivor's
self mask and, for each dropped neighbour ``d`` of a survivor ``u``, ``sign(u, d) PRG(s_ud)``.
The aggregator rebuilds exactly those seeds (``unmasking``) and subtracts them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from fedq.protocol.secagg.prg import expand


def sign(me: str, peer: str) -> int:
    """+1 if ``me`` sorts before ``peer``, -1 after: the two ends of a pair mask with opposite signs."""
    if me == peer:
        raise ValueError("a client has no pairwise mask with itself")
    return 1 if me < peer else -1


def _apply(acc: np.ndarray, seed: bytes, direction: int) -> None:
    mask = expand(seed, acc.size)
    if direction > 0:
        np.add(acc, mask, out=acc)
    else:
        np.subtract(acc, mask, out=acc)


def mask_input(x: np.ndarray, me: str, self_seed: bytes, pair_seeds: Mapping[str, bytes]) -> np.ndarray:
    """``x`` (uint32) plus the self mask and the signed pairwise masks with each peer in ``pair_seeds``."""
    if x.dtype != np.uint32 or x.ndim != 1:
        raise ValueError("the input is a flat uint32 vector")
    y = x.copy()
    _apply(y, self_seed, +1)
    for peer, seed in pair_seeds.items():
        _apply(y, seed, sign(me, peer))
    return y


def remove_masks(total: np.ndarray, self_seeds: Iterable[bytes],
                 dangling: Iterable[tuple[str, str, bytes]]) -> np.ndarray:
    """``total`` less each survivor's self mask and each ``(survivor, dropped, seed)`` pairwise mask."""
    out = total.astype(np.uint32, copy=True)
    for seed in self_seeds:
        _apply(out, seed, -1)
    for survivor, dropped, seed in dangling:
        _apply(out, seed, -sign(survivor, dropped))
    return out


def add_into(acc: np.ndarray, y: np.ndarray) -> None:
    """Fold one masked vector into the running uint32 sum (wraps modulo 2^32)."""
    np.add(acc, y, out=acc)
