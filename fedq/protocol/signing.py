"""Signed updates: each client signs what it claims with its own Ed25519 key.

The signature covers the run id, the round, the client id, the sample count and a digest
of the tensors (names, dtypes, shapes and bytes), so a forged, altered, replayed (another
round or run) or re-attributed update fails verification. A compressed update signs what
travels (its int8 codes and scales, or float16 values) and how to read it (the encoding and
block size), so neither can be changed without breaking the signature. Private keys stay with their
clients (a file, a Kubernetes Secret); the aggregator holds only the public keys, in a file
rather than in Redis, so that write access to Redis is not enough to add a client.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedq.errors import ConfigError, UpdateRejected

CONTEXT = "fedq-update-v1"  # domain separation: a signature over anything else never verifies


def tensors_digest(names: Sequence[str], tensors: Sequence[np.ndarray]) -> bytes:
    """SHA-256 over every tensor's name, little-endian dtype, shape and bytes, in order."""
    h = hashlib.sha256()
    for name, t in zip(names, tensors, strict=True):
        arr = np.ascontiguousarray(t, dtype=np.dtype(t.dtype).newbyteorder("<"))
        h.update(msgpack.packb([name, arr.dtype.str, list(arr.shape)]))
        h.update(arr.data.cast("B") if arr.size else b"")
    return h.digest()


def signed_message(run_id: str, round_no: int, client_id: str, num_examples: int, digest: bytes,
                   compression: Mapping[str, Any] | None = None) -> bytes:
    """The exact bytes a client signs (msgpack of a list is canonical).

    A compressed update appends [encoding, block size] (block 0 when the encoding has none);
    an uncompressed update signs the same bytes as before compression existed."""
    fields: list[Any] = [CONTEXT, run_id, int(round_no), client_id, int(num_examples), digest]
    if compression is not None:
        fields.append([str(compression.get("encoding")), int(compression.get("block", 0))])
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return packed


class Signer:
    """A client's private key."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def from_file(cls, path: str | Path) -> Signer:
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot read signing key {str(path)!r}: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"signing key {str(path)!r} is not an Ed25519 private key")
        return cls(key)

    def sign(self, run_id: str, round_no: int, client_id: str, num_examples: int,
             names: Sequence[str], tensors: Sequence[np.ndarray],
             compression: Mapping[str, Any] | None = None) -> bytes:
        """Sign an update; names/tensors are what travels (the compressed ones when compressed)."""
        return self.sign_digest(run_id, round_no, client_id, num_examples, tensors_digest(names, tensors),
                                compression)

    def sign_digest(self, run_id: str, round_no: int, client_id: str, num_examples: int, digest: bytes,
                    compression: Mapping[str, Any] | None = None) -> bytes:
        """Sign over a digest of the weights made elsewhere (an update sent in parts)."""
        return self._key.sign(signed_message(run_id, round_no, client_id, num_examples, digest, compression))


class Verifier:
    """The public keys of a run's clients, by client id."""

    def __init__(self, keys: Mapping[str, Ed25519PublicKey], max_examples: Mapping[str, int] | None = None) -> None:
        self._keys = dict(keys)
        self._max_examples = dict(max_examples or {})

    def knows(self, client_id: str) -> bool:
        """Whether client_id is in the registry (only those may join a run that needs signatures)."""
        return client_id in self._keys

    def max_examples(self, client_id: str) -> int | None:
        """The most samples the operator lets this client claim in one update (None: no limit
        provisioned; the rows it joined with still cap it)."""
        return self._max_examples.get(client_id)

    @classmethod
    def from_file(cls, path: str | Path) -> Verifier:
        """Load a registry written by ``fedq keys new``: JSON with "clients" {client id: base64 raw
        public key} and, optionally, "limits" {client id: {"max_examples": N}}."""
        try:
            raw = json.loads(Path(path).read_text())
            keys = {cid: Ed25519PublicKey.from_public_bytes(base64.b64decode(b64, validate=True))
                    for cid, b64 in raw["clients"].items()}
            limits = raw.get("limits") or {}
            max_examples = {cid: _positive_int(entry["max_examples"], f"limits.{cid}.max_examples")
                            for cid, entry in limits.items() if entry.get("max_examples") is not None}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"cannot read client public keys {str(path)!r}: {exc}") from None
        return cls(keys, max_examples)

    def verify(self, run_id: str, round_no: int, client_id: str, num_examples: int, names: Sequence[str],
               tensors: Sequence[np.ndarray], signature: bytes | None,
               compression: Mapping[str, Any] | None = None, digest: bytes | None = None) -> None:
        """Raise UpdateRejected (unsigned, unknown_key, bad_signature) unless the signature holds
        (over digest when given, else over the tensors' digest)."""
        if signature is None:
            raise UpdateRejected("unsigned", "this run requires signed updates")
        key = self._keys.get(client_id)
        if key is None:
            raise UpdateRejected("unknown_key", f"no public key for client {client_id!r}")
        if not isinstance(signature, bytes) or len(signature) != 64:
            raise UpdateRejected("bad_signature", "an Ed25519 signature is 64 bytes")
        try:
            key.verify(signature, signed_message(run_id, round_no, client_id, num_examples,
                                                 digest if digest is not None else tensors_digest(names, tensors),
                                                 compression))
        except InvalidSignature:
            raise UpdateRejected("bad_signature", f"signature does not match client {client_id!r}'s key "
                                 "for this run, round, sample count and weights") from None


def _positive_int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} must be a positive integer, not {value!r}")
    return value


def new_keys(client_ids: Sequence[str], max_examples: int | None = None) -> tuple[dict[str, bytes], dict[str, object]]:
    """Fresh keys: ({client id: private key PEM}, public registry for the aggregator), with
    each client's provisioned sample limit when max_examples is given."""
    private, public = {}, {}
    for cid in client_ids:
        key = Ed25519PrivateKey.generate()
        private[cid] = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
        public[cid] = base64.b64encode(key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()
    registry: dict[str, object] = {"version": 1, "algorithm": "ed25519", "clients": public}
    if max_examples is not None:
        registry["limits"] = {cid: {"max_examples": int(max_examples)} for cid in client_ids}
    return private, registry


def secrets_yaml(private: Mapping[str, bytes], registry: Mapping[str, object], namespace: str | None) -> str:
    """Kubernetes Secrets: one per client (its private key), one with the public registry."""
    ns = f"  namespace: {namespace}\n" if namespace else ""
    docs = []
    for cid, pem in private.items():
        docs.append(f"apiVersion: v1\nkind: Secret\nmetadata:\n  name: fedq-signing-{cid}\n{ns}"
                    f"type: Opaque\ndata:\n  signing.key: {base64.b64encode(pem).decode()}\n")
    reg = base64.b64encode(json.dumps(registry, indent=2).encode()).decode()
    docs.append(f"apiVersion: v1\nkind: Secret\nmetadata:\n  name: fedq-client-keys\n{ns}"
                f"type: Opaque\ndata:\n  client-keys.json: {reg}\n")
    return "---\n".join(docs)
