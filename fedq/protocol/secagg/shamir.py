"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

A secret ``s`` (an integer below 2^256) is the constant term of a random polynomial of degree
``t - 1``; holder ``x`` (an integer >= 1) gets ``f(x)``. Any ``t`` shares give ``s`` back by
Lagrange interpolation at 0; fewer say nothing about it (every value is equally likely). The
Mersenne prime 2^521 - 1 is larger than every secret, so no secret is reduced.

Reconstruction is always verified against something public the owner committed to (its public
key, or a hash of its seed): a wrong share gives a wrong secret, which ``recover`` notices and
then tries other ``t``-subsets of the shares; shares off the verified polynomial are named as
bad. Too few shares, or no subset that verifies, raise ``SecAggError`` -- never a wrong secret.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from fedq.errors import SecAggError

PRIME = 2**521 - 1
SECRET_BYTES = 32
SHARE_BYTES = 66  # a field element, big-endian
MAX_TRIES = 256  # t-subsets tried before reconstruction gives up


def split(secret: bytes, holders: Sequence[int], threshold: int) -> dict[int, bytes]:
    """Shares of a 32-byte ``secret`` for holders x (distinct, >= 1): any ``threshold`` of them rebuild it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a secret is {SECRET_BYTES} bytes, got {len(secret)}")
    if len(set(holders)) != len(holders) or not all(1 <= x < PRIME for x in holders):
        raise ValueError("holders must be distinct integers >= 1")
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"threshold must be in [1, {len(holders)}], got {threshold}")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x).to_bytes(SHARE_BYTES, "big") for x in holders}


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    y = 0
    for c in reversed(coefficients):
        y = (y * x + c) % PRIME
    return y


def _parse(x: object, share: object) -> tuple[int, int]:
    if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x < PRIME:
        raise SecAggError("bad_share", f"share holder {x!r} is not an integer >= 1")
    if not isinstance(share, bytes) or len(share) != SHARE_BYTES:
        raise SecAggError("bad_share", f"share from holder {x} is not {SHARE_BYTES} bytes")
    y = int.from_bytes(share, "big")
    if y >= PRIME:
        raise SecAggError("bad_share", f"share from holder {x} is not a field element")
    return x, y


def _interpolate(points: Sequence[tuple[int, int]], at: int) -> int:
    """The value at ``at`` of the polynomial of degree < len(points) through ``points``."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


@dataclass(frozen=True)
class Recovered:
    """A verified secret and the holders whose shares are not on its polynomial."""

    secret: bytes
    bad_holders: tuple[int, ...]


def recover(shares: Mapping[int, bytes], threshold: int, verify: Callable[[bytes], bool],
            what: str = "secret") -> Recovered:
    """The secret the shares encode, checked by ``verify``; ``SecAggError`` if none can be trusted."""
    points = sorted(_parse(x, s) for x, s in shares.items())
    if len(points) < threshold:
        raise SecAggError("too_few_shares", f"{what}: {len(points)} shares revealed, {threshold} needed")
    for subset in itertools.islice(itertools.combinations(points, threshold), MAX_TRIES):
        value = _interpolate(subset, 0)
        if value >> (8 * SECRET_BYTES):
            continue
        secret = value.to_bytes(SECRET_BYTES, "big")
        if verify(secret):
            bad = tuple(x for x, y in points if _interpolate(subset, x) != y)
            return Recovered(secret, bad)
    raise SecAggError("inconsistent_shares",
                      f"{what}: no {threshold} of the {len(points)} shares rebuild a secret that matches "
                      "what its owner committed to")
