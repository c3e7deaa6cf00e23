"""Strategies, partitioning, sampling, evaluation and a model of your own through the CLI, as real
processes (on a terminal: the progress `fedq run` shows there is checked on the way); and their
configuration errors as one clear line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from support.cli import assert_error_line, fedq
from support.cli import pipe_env as _env
from support.procs import ROOT, cli_env, fedq_cmd
from support.terminal import run_on_terminal

pytestmark = pytest.mark.slow


def test_fedprox_with_sampling_dirichlet_and_federated_evaluation_on_a_terminal(tmp_path: Path) -> None:
    env = cli_env(None, COLUMNS="200", FEDQ_TF_THREADS="1")
    # The model's module lives in tests/; every process of the run must be able to import it.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests"), env.get("PYTHONPATH")]))
    out = tmp_path / "out"
    code, shown = run_on_terminal(fedq_cmd("run", "--clients", "3", "--rounds", "2", "--local-epochs", "1",
                                           "--model", "byo_models:build_mlp", "--strategy", "fedprox",
                                           "--fraction-fit", "0.6", "--partition", "dirichlet", "--alpha", "1.0",
                                           "--val-fraction", "0.2", "--out", str(out)), env, timeout=400)
    assert code == 0, shown[-3000:]
    # On a terminal, fedq run shows its progress and ends with the final accuracy and the curves.
    assert "waiting for clients" in shown or "updates in" in shown, shown[-3000:]
    assert "final test accuracy" in shown
    assert (out / "curves.png").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "finished"
    assert report["strategy"]["name"] == "fedprox" and report["strategy"]["mu"] == 0.1
    rounds = report["rounds"]
    assert [r["num_updates"] for r in rounds] == [2, 2]
    assert all(len(r["selected"]) == 2 and r["clients"] == r["selected"] for r in rounds)
    for r in rounds:  # every round's model evaluated centrally (binary: AUC etc.) and by the clients
        assert 0 <= r["test_auc"] <= 1 and r["fed_eval_examples"] > 0 and 0 <= r["fed_eval_accuracy"] <= 1
    final = report["final_evaluation"]
    assert final["fed_eval_accuracy"] == rounds[-1]["fed_eval_accuracy"] and "test_f1" in final
    data = report["client_data"]
    assert sorted(data) == ["client-0", "client-1", "client-2"]
    assert all(d["partition"] == "dirichlet" and sum(d["labels"]) == d["rows"] + d["val_rows"] for d in data.values())
    import keras

    assert keras.models.load_model(out / "model.keras").input_shape == (None, 30)


@pytest.mark.parametrize("args, needles", [
    (["--strategy", "krum", "--clients", "3"], ["krum", "needs at least 5 clients per round"]),
    (["--strategy", "multi-krum", "--clients", "6", "--byzantine", "2", "--fraction-fit", "0.5"],
     ["needs at least 7 clients per round", "has 3"]),
    (["--model", "nowhere/model.keras"], ["model file not found", "model.keras"]),
    (["--model", "not a model"], ["unknown model"]),
    (["--strategy", "krum", "--clients", "5", "--krum-keep", "9"], ["krum keep"]),
])
def test_bad_strategy_and_model_options_are_one_line(redis_url: str, tmp_path: Path, args: list[str],
                                                     needles: list[str]) -> None:
    proc = fedq("run", *args, "--out", str(tmp_path / "out"), env=_env(None))
    assert_error_line(proc, *needles)
    assert not (tmp_path / "out").exists()
