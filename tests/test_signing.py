"""Signed updates: what a signature covers, and what fails to verify."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedq.errors import ConfigError, UpdateRejected
from fedq.protocol.signing import Signer, Verifier, new_keys, secrets_yaml, tensors_digest

NAMES = ["dense/kernel", "dense/bias"]
TENSORS = [np.arange(12, dtype=np.float32).reshape(3, 4), np.zeros(4, np.float32)]


@pytest.fixture()
def keys(tmp_path: Path) -> tuple[dict[str, Signer], Verifier]:
    private, registry = new_keys(["client-0", "client-1"])
    signers = {}
    for cid, pem in private.items():
        (tmp_path / f"{cid}.key").write_bytes(pem)
        signers[cid] = Signer.from_file(tmp_path / f"{cid}.key")
    (tmp_path / "client-keys.json").write_text(json.dumps(registry))
    return signers, Verifier.from_file(tmp_path / "client-keys.json")


def test_a_signed_update_verifies(keys) -> None:
    signers, verifier = keys
    sig = signers["client-0"].sign("run", 3, "client-0", 100, NAMES, TENSORS)
    verifier.verify("run", 3, "client-0", 100, NAMES, TENSORS, sig)  # no exception


@pytest.mark.parametrize("change", ["run", "round", "client", "count", "weights", "names", "dtype"])
def test_anything_the_signature_covers_changed_fails(keys, change: str) -> None:
    signers, verifier = keys
    sig = signers["client-0"].sign("run", 3, "client-0", 100, NAMES, TENSORS)
    args = {"run_id": "run", "round_no": 3, "client_id": "client-0", "num_examples": 100,
            "names": NAMES, "tensors": TENSORS}
    if change == "run":
        args["run_id"] = "other-run"  # replayed into another run
    elif change == "round":
        args["round_no"] = 4  # replayed into another round
    elif change == "client":
        args["client_id"] = "client-1"  # posing as another client
    elif change == "count":
        args["num_examples"] = 1000  # inflating its weight
    elif change == "weights":
        tampered = [t.copy() for t in TENSORS]
        tampered[1][0] = 1e-3
        args["tensors"] = tampered
    elif change == "names":
        args["names"] = ["a", "b"]
    elif change == "dtype":
        args["tensors"] = [t.astype(np.float64) for t in TENSORS]
    with pytest.raises(UpdateRejected) as err:
        verifier.verify(signature=sig, **args)
    assert err.value.reason == "bad_signature"


def test_unsigned_unknown_and_malformed_signatures_are_refused(keys) -> None:
    signers, verifier = keys
    with pytest.raises(UpdateRejected, match="unsigned"):
        verifier.verify("run", 1, "client-0", 1, NAMES, TENSORS, None)
    sig = signers["client-0"].sign("run", 1, "client-9", 1, NAMES, TENSORS)
    with pytest.raises(UpdateRejected) as err:
        verifier.verify("run", 1, "client-9", 1, NAMES, TENSORS, sig)
    assert err.value.reason == "unknown_key"
    with pytest.raises(UpdateRejected) as err:
        verifier.verify("run", 1, "client-0", 1, NAMES, TENSORS, b"short")
    assert err.value.reason == "bad_signature"


def test_another_clients_key_does_not_verify(keys) -> None:
    signers, verifier = keys
    forged = signers["client-1"].sign("run", 1, "client-0", 10, NAMES, TENSORS)
    with pytest.raises(UpdateRejected, match="bad_signature"):
        verifier.verify("run", 1, "client-0", 10, NAMES, TENSORS, forged)


def test_digest_is_layout_independent_but_value_sensitive() -> None:
    base = tensors_digest(NAMES, TENSORS)
    fortran = [np.asfortranarray(TENSORS[0]), TENSORS[1]]
    big_endian = [TENSORS[0].astype(">f4"), TENSORS[1]]
    assert tensors_digest(NAMES, fortran) == base == tensors_digest(NAMES, big_endian)
    assert tensors_digest(NAMES, [TENSORS[0].reshape(4, 3), TENSORS[1]]) != base


def test_bad_key_files_are_config_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.key").write_text("not a key")
    with pytest.raises(ConfigError, match="signing key"):
        Signer.from_file(tmp_path / "junk.key")
    with pytest.raises(ConfigError, match="public keys"):
        Verifier.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"clients": {"c": "!!!"}}))
    with pytest.raises(ConfigError, match="public keys"):
        Verifier.from_file(tmp_path / "bad.json")


def test_secrets_are_valid_kubernetes_secrets() -> None:
    private, registry = new_keys(["client-0", "client-1"])
    docs = list(yaml.safe_load_all(secrets_yaml(private, registry, "fedq")))
    assert [d["metadata"]["name"] for d in docs] == ["fedq-signing-client-0", "fedq-signing-client-1",
                                                     "fedq-client-keys"]
    assert all(d["kind"] == "Secret" and d["metadata"]["namespace"] == "fedq" for d in docs)
    assert "signing.key" in docs[0]["data"] and "client-keys.json" in docs[2]["data"]
