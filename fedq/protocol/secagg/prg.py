"""Seeds expanded to uint32 mask vectors: the ChaCha20 keystream.

Why ChaCha20 (from ``cryptography``, i.e. OpenSSL) rather than numpy's Philox: a mask must be
unpredictable to anyone without the seed, which is what a stream cipher is designed and
analysed for; Philox is a statistical generator (it passes BigCrush) with no such claim and a
128-bit key where our seeds are 256 bits. ChaCha20 also has a fixed, documented output, so any
implementation (another language, another numpy) expands a seed to the same mask, and OpenSSL
runs it at gigabytes per second: a 1M-parameter mask is a few milliseconds.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedq.errors import SecAggError

SEED_BYTES = 32
_NONCE = bytes(16)  # a zero counter and nonce: every seed is a fresh HKDF output, used for one mask


def expand(seed: bytes, length: int) -> np.ndarray:
    """``length`` uint32 values, uniform on [0, 2^32), from a 32-byte seed (little-endian keystream words)."""
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise SecAggError("bad_seed", f"a mask seed is {SEED_BYTES} bytes")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    stream = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor().update(bytes(4 * length))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32, copy=False)
