"""--model is checked before anything starts; a failed run's output directory holds that run's
files only; data too narrow for the seed network points to the built-in mlp (which trains on it,
over an earlier run's outputs: tests/test_e2e.py's `fedq run`)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import redis
from support.cli import assert_error_line, fedq
from support.cli import pipe_env as _env
from support.data import iris_csv, stale_outputs
from support.procs import fedq_cmd

from fedq.learning.spec import RunSpec
from fedq.protocol.store import RunStore

pytestmark = pytest.mark.slow  # every test here runs the fedq CLI as a process (seconds to tens of seconds each)


def test_run_with_a_model_module_that_does_not_exist_fails_at_once(tmp_path: Path) -> None:
    out = tmp_path / "out"
    stale_outputs(out)
    started = time.monotonic()
    proc = fedq("run", "--model", "no_such_module_xyz:build", "--out", str(out), env=_env(None))
    took = time.monotonic() - started
    assert_error_line(proc, "cannot import model module 'no_such_module_xyz'")
    assert "wrote" not in proc.stdout and "started" not in proc.stdout, proc.stdout
    assert took < 30, f"the model was checked after {took:.0f} s"
    assert not (out / "logs").exists(), "nothing may start for a model that cannot be imported"


def test_run_with_a_builder_that_fails_on_the_data_shape_fails_before_starting(tmp_path: Path) -> None:
    (tmp_path / "picky_models.py").write_text(
        "def build(input_shape, num_classes):\n"
        "    raise ValueError(f'wants 7 features, got {input_shape}')\n")
    env = _env(None, PYTHONPATH=f"{tmp_path}")
    proc = subprocess.run(fedq_cmd("run", "--model", "picky_models:build", "--out", str(tmp_path / "out")),
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert_error_line(proc, "model builder picky_models:build failed", "wants 7 features, got (30,)")
    assert not (tmp_path / "out" / "logs").exists()


def test_submit_with_a_model_module_that_does_not_exist_stores_nothing(redis_url: str, r: redis.Redis) -> None:
    proc = fedq("submit", "--model", "no_such_module_xyz:build", env=_env(redis_url))
    assert_error_line(proc, "cannot import model module 'no_such_module_xyz'")
    assert not r.keys("fedq:*"), "a run with a model that cannot be built must not be stored"


def test_report_of_a_failed_run_replaces_a_previous_runs_files(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    run_id = "failed-run"  # created as `fedq submit` creates it (test_cli_errors runs submit itself)
    RunStore(r, run_id).create(RunSpec(clients=2, rounds=2, run_id=run_id))
    RunStore(r, run_id).fail("a round had no quorum")
    out = tmp_path / "out"
    stale_outputs(out)
    proc = fedq("report", "--run", run_id, "--out", str(out), env=_env(redis_url))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["report.json"], "a failed run's report beside an old model"
    assert json.loads((out / "report.json").read_text())["status"] == "failed"
    assert "failed" in proc.stdout and "a round had no quorum" in proc.stdout, proc.stdout
    assert "wrote" not in proc.stdout, proc.stdout


def test_data_too_narrow_for_the_seed_network_points_to_mlp(tmp_path: Path) -> None:
    csv = iris_csv(tmp_path / "iris.csv")
    proc = fedq("run", "--csv", str(csv), "--label-column", "species", "--out", str(tmp_path / "out"),
                env=_env(None))
    assert_error_line(proc, "the seed network needs at least 5 features, the data has 4", "--model mlp")
