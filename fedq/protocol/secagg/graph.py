"""The communication graph: each client masks against, and shares its secrets with, k others.

SecAgg (Bonawitz et al.) puts every pair of clients in contact: O(n^2) keys and masks. SecAgg+
(Bell et al.) uses a sparse random k-regular graph instead, with k logarithmic in n. fedq's is a
circulant (Harary) graph over a seeded shuffle of the clients: place them on a ring in the order
of SHA-256(seed, id) and link each to the k/2 nearest on either side. Everyone who knows the
seed and the client list computes the same graph; with ``k >= n - 1`` it is the complete graph.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def neighbours(clients: Sequence[str], k: int, seed: bytes) -> dict[str, frozenset[str]]:
    """Each client's k neighbours (never itself): symmetric, k-regular (k even, or k >= n - 1)."""
    ids = list(clients)
    n = len(ids)
    if len(set(ids)) != n:
        raise ValueError("client ids must be distinct")
    if k >= n - 1:
        return {c: frozenset(ids) - {c} for c in ids}
    if k < 1 or k % 2:
        raise ValueError(f"k must be even and >= 2 when below n - 1 = {n - 1}, got {k}")
    ring = sorted(ids, key=lambda c: (hashlib.sha256(seed + b"\0" + c.encode()).digest(), c))
    half = k // 2
    return {
        c: frozenset(ring[(i + d) % n] for d in range(-half, half + 1) if d)
        for i, c in enumerate(ring)
    }


def holder_index(clients: Sequence[str]) -> dict[str, int]:
    """The public Shamir x-coordinate of each client (1-based position in sorted order)."""
    return {c: i + 1 for i, c in enumerate(sorted(clients))}
