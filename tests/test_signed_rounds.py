"""Signed updates end to end: the aggregator verifies before it aggregates, and records why not."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from support.fake_client import fake_client_cmd, fake_client_env
from support.federation import noisy as _noisy
from support.procs import cli_env, fedq_cmd

from fedq.learning.aggregate import fedavg
from fedq.protocol.signing import Signer


def _keys(tmp_path: Path) -> Path:
    done = subprocess.run(fedq_cmd("keys", "new", "--clients", "3", "--out", str(tmp_path), "--namespace", "fl"),
                          env=cli_env(None), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    secrets = list(yaml.safe_load_all(done.stdout))
    assert len(secrets) == 4 and secrets[-1]["metadata"]["name"] == "fedq-client-keys"
    assert (tmp_path / "client-0.key").stat().st_mode & 0o077 == 0  # private keys are private
    return tmp_path


@pytest.mark.slow
def test_unsigned_forged_replayed_and_unknown_updates_are_refused(harness_factory, tmp_path: Path) -> None:
    keydir = _keys(tmp_path)
    # The harness joins c0, c1, c2; the keys are for client-0..2: re-label the registry.
    reg = json.loads((keydir / "client-keys.json").read_text())
    reg["clients"] = {f"c{k}": reg["clients"][f"client-{k}"] for k in range(3)}
    (keydir / "client-keys.json").write_text(json.dumps(reg))
    signer = {f"c{k}": Signer.from_file(keydir / f"client-{k}.key") for k in range(3)}

    h = harness_factory(3, "t-signed", client_keys=str(keydir / "client-keys.json"))
    _, names, g = h.global_model()

    def signed(cid: str, rnd: int, n: int, tensors: list[np.ndarray], as_client: str | None = None) -> bytes:
        sig = signer[as_client or cid].sign(h.store.run_id, rnd, cid, n, names, tensors)
        return h.update(cid, rnd, n, tensors, names, signature=sig)

    # Round 1: c2 unsigned; round 2: c2 signed with c0's key (forged); round 3: c2 replays its
    # own valid round-2 update, re-labelled as round 3 (the signature covers the round).
    good = {r: [_noisy(g, 10 * r + i) for i in range(3)] for r in (1, 2, 3)}
    expected_reason = {1: "unsigned", 2: "bad_signature", 3: "bad_signature"}
    for rnd in (1, 2, 3):
        for i, cid in enumerate(("c0", "c1")):
            assert h.push(cid, rnd, signed(cid, rnd, 100 * (i + 1), good[rnd][i])) == "ok"
        if rnd == 1:
            bad = h.update("c2", 1, 50, good[1][2], names)
        elif rnd == 2:
            bad = signed("c2", 2, 50, good[2][2], as_client="c0")
        else:
            sig = signer["c2"].sign(h.store.run_id, 2, "c2", 50, names, good[2][2])
            bad = h.update("c2", 3, 50, good[2][2], names, signature=sig)
        assert h.push("c2", rnd, bad) == "ok"
        h.wait_round(rnd)
        last = h.store.refused()[-1]
        assert (last["client"], last["round"], last["reason"]) == ("c2", rnd, expected_reason[rnd])
        _, _, new = h.global_model()
        want = fedavg([(good[rnd][0], 100), (good[rnd][1], 200)])
        for got, w in zip(new, want):
            np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-6)
    assert h.store.state()["status"] == "finished"


@pytest.mark.slow
def test_a_signed_federation_through_the_cli(redis_url: str, r, tmp_path: Path) -> None:
    """Keys made by `fedq keys new`, read from the environment by the CLI's roles. Signing is what
    is tested, not learning: no central evaluation, and support.fake_client's roles (FakeTrainer
    clients; the aggregator's run comes with support.initial's model): no TensorFlow."""
    from fedq.protocol.store import RunStore

    keydir = _keys(tmp_path / "keys")
    base = fake_client_env(cli_env(redis_url))
    agg_env = base | {"FEDQ_CLIENT_KEYS": str(keydir / "client-keys.json")}
    procs = [subprocess.Popen(fake_client_cmd("aggregator", "--clients", "2", "--rounds", "2", "--local-epochs", "1",
                                              "--no-central-eval", "--run-id", "signed-cli"), env=agg_env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)]
    for k in range(2):
        env = base | {"FEDQ_SIGNING_KEY": str(keydir / f"client-{k}.key")}
        procs.append(subprocess.Popen(fake_client_cmd("client", "--shard", str(k), "--once"), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out.decode(errors="replace")[-3000:]
    store = RunStore(r, "signed-cli")
    assert store.state()["status"] == "finished"
    assert store.refused() == [] and all(m["num_updates"] == 2 for m in store.metrics())
