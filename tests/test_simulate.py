"""`fedq simulate`: many lightweight clients (threads, numpy updates) through the real protocol."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from helpers import cli_env, fedq_cmd

pytestmark = pytest.mark.slow


def test_sixty_simulated_clients_complete_their_rounds(tmp_path: Path) -> None:
    done = subprocess.run(fedq_cmd("simulate", "--clients", "60", "--rounds", "2", "--processes", "2",
                                   "--rows-per-client", "20", "--out", str(tmp_path)),
                          env=cli_env(None), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ms of round time per update" in done.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "finished"
    assert [r["num_updates"] for r in report["rounds"]] == [60, 60]
    assert report["spec"]["data"]["source"] == "synthetic" and report["spec"]["data"]["rows"] == 1200
