"""Compression end to end: a real `fedq run --compression int8` against the same federation in
float32, and `fedq simulate --compression float16` (without central evaluation: its aggregator
loads no TensorFlow), each a federation of real processes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from support.procs import cli_env, fedq_cmd

pytestmark = pytest.mark.slow

ROUNDS, EPOCHS, SEED = 2, 2, 0


def _float32_reference() -> float:
    """Final test accuracy of the same federation without compression, computed in this process
    by fedq.roles.simulation (the same split, scaler, trainers and FedAvg; it reproduces a real
    `fedq run`'s figures, and is quicker than a second federation of processes)."""
    from fedq.learning.dataspec import DataSpec
    from fedq.learning.spec import RunSpec
    from fedq.roles.simulation import Federation

    spec = RunSpec(clients=2, rounds=ROUNDS, local_epochs=EPOCHS, seed=SEED, data=DataSpec(seed=SEED))
    return Federation.build(spec).run()[-1]["test_accuracy"]


def test_int8_federation_matches_float32_and_reports_its_error(tmp_path: Path) -> None:
    proc = subprocess.Popen(fedq_cmd("run", "--clients", "2", "--rounds", str(ROUNDS), "--local-epochs", str(EPOCHS),
                                     "--seed", str(SEED), "--compression", "int8", "--out", str(tmp_path)),
                            env=cli_env(None), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        reference = _float32_reference()  # while the federation runs
        out = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "finished" and report["spec"]["compression"] == "int8"
    assert report["final"]["test_accuracy"] > 0.85
    assert abs(report["final"]["test_accuracy"] - reference) <= 0.03, (report["final"], reference)

    comp = report["compression"]
    assert comp["encoding"] == "int8" and 0 < comp["error_mean"] <= comp["error_max"] < 0.05
    assert comp["ratio"] < 0.3  # 1 byte per value and a float32 scale per tensor (each fits one block)
    for rnd in report["rounds"]:
        assert rnd["compression"]["compressed_updates"] == 2 and rnd["compression"]["error_max"] > 0
    assert "updates as int8" in out and "relative error of the deltas" in out
    # The seed network's model.keras takes the standardised features as (n, features, 1).
    import keras

    model = keras.models.load_model(tmp_path / "model.keras")
    scaler = json.loads((tmp_path / "scaler.json").read_text())
    assert model.input_shape == (None, len(scaler["mean"]), 1)


def test_simulate_with_float16_updates(tmp_path: Path) -> None:
    done = subprocess.run(fedq_cmd("simulate", "--clients", "6", "--rounds", "2", "--processes", "1",
                                   "--rows-per-client", "20", "--compression", "float16", "--no-central-eval",
                                   "--out", str(tmp_path)),
                          env=cli_env(None), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "finished" and report["refused"] == []
    assert [r["compression"]["compressed_updates"] for r in report["rounds"]] == [6, 6]
    comp = report["compression"]
    # Deltas of N(0, 1e-3) noise: float16 keeps 11 significant bits; 2 bytes a value and a scale per tensor.
    assert comp["encoding"] == "float16" and 0.5 < comp["ratio"] < 0.53 and 0 < comp["error_max"] < 1e-3
