"""curves.png: drawn from a run's rounds, written by `fedq report` beside report.json."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest
import redis
from support.dashboard import make_run
from support.procs import cli_env, fedq_cmd

from fedq.errors import FedqError
from fedq.protocol.store import RunStore
from fedq.roles.plots import write_curves
from fedq.roles.report import write_report


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_curves_png_of_accuracy_and_loss(tmp_path: Path) -> None:
    rounds = [{"round": k, "train_accuracy": 0.7 + k / 20, "test_accuracy": 0.68 + k / 20,
               "train_loss": 1 / k, "test_loss": 1.2 / k} for k in range(1, 6)]
    path = write_curves(rounds, tmp_path / "sub" / "curves.png", title="run x")
    assert path == tmp_path / "sub" / "curves.png"
    assert png_size(path) == (1000, 400)
    assert path.stat().st_size > 10_000  # two panels with lines, axes and legends, not a blank image


def test_missing_values_are_skipped_and_no_rounds_means_no_file(tmp_path: Path) -> None:
    rounds = [{"round": 1, "train_accuracy": 0.7, "test_accuracy": None, "train_loss": 0.5, "test_loss": None},
              {"round": 2, "train_accuracy": 0.8, "test_accuracy": 0.75, "train_loss": 0.4, "test_loss": 0.45}]
    assert png_size(write_curves(rounds, tmp_path / "a.png")) == (1000, 400)
    assert write_curves([], tmp_path / "b.png") is None
    assert not (tmp_path / "b.png").exists()


def test_report_writes_curves_beside_report_json(r: redis.Redis, tmp_path: Path) -> None:
    make_run(r, "plotted", rounds=3, committed=2)
    report = write_report(RunStore(r, "plotted"), tmp_path, with_model=False)
    assert [x["round"] for x in report["rounds"]] == [1, 2]
    assert png_size(tmp_path / "curves.png") == (1000, 400)
    assert json.loads((tmp_path / "report.json").read_text())["run_id"] == "plotted"


def png_text(path: Path) -> dict[str, str]:
    """The PNG's tEXt chunks (keyword -> text)."""
    data, at, out = path.read_bytes(), 8, {}
    while at < len(data):
        (size,), kind = struct.unpack(">I", data[at:at + 4]), data[at + 4:at + 8]
        if kind == b"tEXt":
            key, _, text = data[at + 8:at + 8 + size].partition(b"\0")
            out[key.decode("latin-1")] = text.decode("latin-1")
        at += 12 + size
    return out


@pytest.mark.slow
def test_fedq_report_command_lists_curves_png_with_the_x_axis_asked_for(redis_url: str, r: redis.Redis,
                                                                        tmp_path: Path) -> None:
    make_run(r, "reported", rounds=3, committed=2)  # running: no model is saved, curves are
    for axis, label in (("round", "round"), ("time", "minutes since start")):
        out = tmp_path / axis
        args = ("report", "--run", "reported", "--out", str(out)) + (("--x-axis", axis) if axis == "time" else ())
        done = subprocess.run(fedq_cmd(*args), env=cli_env(redis_url), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert (out / "curves.png").exists() and (out / "report.json").exists()
        assert "curves.png" in done.stdout
        assert png_text(out / "curves.png")["Description"] == f"x axis: {label}"
    done = subprocess.run(fedq_cmd("report", "--run", "reported", "--out", str(tmp_path / "x"), "--x-axis", "epoch"),
                          env=cli_env(redis_url), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "'epoch' is not one of 'round', 'time'" in done.stderr, done.stderr


def test_report_curves_on_a_time_axis_are_minutes_since_the_first_start(r: redis.Redis, tmp_path: Path) -> None:
    from fedq.roles.plots import draw_curves
    from fedq.roles.report import run_times

    make_run(r, "timed", rounds=3, committed=3)
    store = RunStore(r, "timed")
    start = float(store.state()["started_at"])
    commits = {int(f["round"]): t for t, f in store.events() if f.get("event") == "round"}
    times = run_times(store)
    assert sorted(times) == [1, 2, 3] and all(abs(times[k] - (commits[k] - start)) < 1e-6 for k in times)
    report = write_report(store, tmp_path, with_model=False, x_axis="time")
    assert png_text(tmp_path / "curves.png")["Description"] == "x axis: minutes since start"
    by_round, by_time = draw_curves(report["rounds"]), draw_curves(report["rounds"], times=times)
    assert [ax.get_xlabel() for ax in by_round.axes] == ["round", "round"]
    assert [ax.get_xlabel() for ax in by_time.axes] == ["minutes since start"] * 2
    test_acc = next(line for line in by_time.axes[0].lines if line.get_label() == "test accuracy")
    assert list(test_acc.get_xdata()) == [times[k] / 60 for k in (1, 2, 3)]
    assert list(test_acc.get_ydata()) == [m["test_accuracy"] for m in report["rounds"]]
    with pytest.raises(FedqError, match="x axis must be one of round, time"):
        write_report(store, tmp_path, with_model=False, x_axis="epoch")


def test_best_round_marked_and_overfitting_noted(tmp_path: Path) -> None:
    from fedq.roles.plots import best_round, overfitting

    # train loss keeps falling; test loss is lowest at round 3, then rises three rounds running
    test_loss = [0.9, 0.6, 0.4, 0.45, 0.5, 0.6]
    rounds = [{"round": k + 1, "train_loss": 1 / (k + 1), "test_loss": tl, "train_accuracy": 0.7 + k / 20,
               "test_accuracy": 0.9 - abs(k - 2) / 20} for k, tl in enumerate(test_loss)]
    assert best_round(rounds) == 3
    note = overfitting(rounds)
    assert note and "test loss rose for 3 rounds" in note and "best round 3" in note
    assert overfitting(rounds[:5]) is None  # only two rounds of rising test loss
    steady = [dict(m, test_loss=1 / m["round"]) for m in rounds]
    assert overfitting(steady) is None
    assert best_round([{"round": 1, "test_loss": 0.5}, {"round": 2, "test_loss": 0.3}]) == 2

    from fedq.roles.plots import draw_curves

    fig = draw_curves(rounds, title="run x")
    for ax in fig.axes:  # the best round: a dashed line on both panels, in their legends
        (line,) = [x for x in ax.lines if x.get_label() == "best round (3)"]
        assert list(line.get_xdata()) == [3, 3] and line.get_linestyle() == "--"
        assert "best round (3)" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert fig.get_suptitle() == f"run x\n{note}"
    assert draw_curves(steady, title="run x").get_suptitle() == "run x"
    plain = write_curves(rounds, tmp_path / "plain.png")
    timed = write_curves(rounds, tmp_path / "timed.png", times={k: 30.0 * k for k in range(1, 7)})
    assert png_size(plain) == png_size(timed) == (1000, 400)
    assert plain.read_bytes() != timed.read_bytes()


def test_curves_with_a_time_axis_skip_rounds_without_a_time(tmp_path: Path) -> None:
    rounds = [{"round": k, "train_loss": 1 / k, "test_loss": 1.1 / k} for k in range(1, 4)]
    assert png_size(write_curves(rounds, tmp_path / "t.png", times={2: 60.0, 3: 120.0})) == (1000, 400)
