"""`fedq simulate`: many lightweight clients (threads, numpy updates) through the real protocol."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from support.procs import cli_env, fedq_cmd

pytestmark = pytest.mark.slow


def test_sixty_simulated_clients_without_central_evaluation_complete_their_rounds_in_parts(tmp_path: Path) -> None:
    """Sixty clients in two processes, and the lean aggregator as users start it: an rq work horse
    whose initial model comes from a spawned child, every model in parts (1 KiB chunks), no test
    metrics. (Central evaluation is covered by every `fedq run` of the suite.)"""
    env = {**cli_env(None), "FEDQ_CHUNK_BYTES": "1024"}
    done = subprocess.run(fedq_cmd("simulate", "--clients", "60", "--rounds", "2", "--processes", "2",
                                   "--no-central-eval", "--rows-per-client", "20", "--out", str(tmp_path)),
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ms of round time per update" in done.stdout
    assert "no central evaluation" in done.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "finished" and report["spec"]["central_eval"] is False
    assert [r["num_updates"] for r in report["rounds"]] == [60, 60]
    assert all(r["test_accuracy"] is None for r in report["rounds"])
    assert report["spec"]["data"]["source"] == "synthetic" and report["spec"]["data"]["rows"] == 1200
