"""Key agreement and sealed messages: X25519, HKDF-SHA256 and ChaCha20-Poly1305.

Each client makes two fresh X25519 key pairs per round, as in Bonawitz et al.: the *mask* pair
(its secret key is shared, and rebuilt if the client drops, so its pairwise masks can be taken
out) and the *channel* pair (seals the shares it sends its neighbours; never shared, so
rebuilding a dropped client's mask key opens none of them). A Diffie-Hellman secret is never
used raw: HKDF derives each key from it with the run, the round, the purpose and both client
ids (in sorted order, so both ends derive the same key) as context.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from fedq.errors import SecAggError

CONTEXT = b"fedq-secagg-v1"  # domain separation from every other use of these primitives
KEY_BYTES = 32
NONCE_BYTES = 12


@dataclass(frozen=True)
class KeyPair:
    """A raw X25519 key pair (32 bytes each)."""

    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        """A fresh key pair from the operating system's random source."""
        key = X25519PrivateKey.generate()
        raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return cls(raw, public_key(raw))


def public_key(private: bytes) -> bytes:
    """The public key of a raw X25519 private key (how a rebuilt key is checked)."""
    if not isinstance(private, bytes) or len(private) != KEY_BYTES:
        raise SecAggError("bad_key", f"an X25519 private key is {KEY_BYTES} bytes")
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def context(purpose: str, run_id: str, round_no: int, *ids: str) -> bytes:
    """Canonical bytes naming what a key, commitment or ciphertext is for (msgpack of a list)."""
    packed: bytes = msgpack.packb([CONTEXT, purpose, run_id, int(round_no), *ids], use_bin_type=True)
    return packed


def derive(secret: bytes, purpose: str, run_id: str, round_no: int, *ids: str) -> bytes:
    """A 32-byte key for one purpose, run, round and set of client ids, from ``secret``."""
    info = context(purpose, run_id, round_no, *ids)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def agree(private: bytes, peer_public: bytes, purpose: str, run_id: str, round_no: int, me: str, peer: str) -> bytes:
    """The key two clients share for ``purpose``: the same at both ends, different for every pair and round."""
    if not isinstance(peer_public, bytes) or len(peer_public) != KEY_BYTES:
        raise SecAggError("bad_key", f"{peer}'s public key is not {KEY_BYTES} bytes")
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:  # OpenSSL refuses an all-zero shared secret
        shared = bytes(KEY_BYTES)
    if shared == bytes(KEY_BYTES):
        raise SecAggError("bad_key", f"{peer}'s public key is a low-order point")
    return derive(shared, purpose, run_id, round_no, *sorted((me, peer)))


def commit(seed: bytes, run_id: str, round_no: int, client: str) -> bytes:
    """A binding, hiding commitment to a client's 32-byte self-mask seed (SHA-256 with context)."""
    return hashlib.sha256(context("commit", run_id, round_no, client) + seed).digest()


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """``nonce || ciphertext`` under ``key``, bound to ``aad`` (who sends to whom, which round)."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, sealed: bytes, aad: bytes, what: str) -> bytes:
    """The plaintext of ``seal``; ``SecAggError`` if it was altered, misaddressed or not for this key."""
    if not isinstance(sealed, bytes) or len(sealed) < NONCE_BYTES + 16:
        raise SecAggError("bad_ciphertext", f"{what}: too short to be sealed")
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except InvalidTag:
        raise SecAggError("bad_ciphertext", f"{what}: does not open (altered, or not sealed for this client)") from None
