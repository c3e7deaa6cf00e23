"""The CLI's error paths, as real processes: one clear line on stderr, a non-zero exit, no traceback.

Every command here fails (or, for submit/status, succeeds) before any training, so no
TensorFlow is imported; each still gets a generous timeout.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import redis
from support.cli import assert_error_line, fedq
from support.cli import pipe_env as _env
from support.redis import free_port

pytestmark = pytest.mark.slow  # every test here runs the fedq CLI as a process (seconds each)

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FEATURES = ["age", "weight", "pressure", "flow", "urea", "sodium"]


def _nonblank(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def assert_usage_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """click's usage error: exit 2, 'Usage:' and one 'Error: ...' line containing every needle."""
    detail = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, detail
    assert proc.returncode == 2, detail
    assert "Usage:" in proc.stderr, detail
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, detail
    for needle in needles:
        assert needle in errors[0], f"{needle!r} missing from {errors[0]!r}"
    return errors[0]


@pytest.fixture()
def labelled_csv(tmp_path: Path) -> Path:
    """A small headed CSV: 6 numeric features and a 0/1 'label' column, 40 rows."""
    rng = np.random.default_rng(0)
    lines = [",".join([*FEATURES, "label"])]
    for i in range(40):
        values = rng.normal(5.0, 2.0, len(FEATURES))
        lines.append(",".join(f"{v:.3f}" for v in values) + f",{i % 2}")
    path = tmp_path / "data.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _submit(redis_url: str, *args: str) -> str:
    proc = fedq("submit", "--clients", "2", "--rounds", "2", *args, env=_env(redis_url))
    assert proc.returncode == 0, proc.stderr
    out = _nonblank(proc.stdout)
    assert len(out) == 1, proc.stdout
    return out[0].strip()


# ---------------------------------------------------------------- fedq run: data errors


def test_run_with_missing_seed_csvs_names_the_path(redis_url: str, tmp_path: Path) -> None:
    missing = tmp_path / "MISSING.csv"
    missing2 = tmp_path / "MISSING2.csv"
    out = tmp_path / "out"
    proc = fedq("run", "--normal-csv", str(missing), "--abnormal-csv", str(missing2),
                "--clients", "2", "--rounds", "1", "--out", str(out), env=_env(redis_url))
    line = assert_error_line(proc, "not found")
    assert str(missing) in line or str(missing2) in line, line
    # Nothing was started or written for a run that could not begin.
    assert not out.exists()
    assert redis.Redis.from_url(redis_url).zcard("fedq:runs") == 0


def test_run_with_one_missing_csv_names_that_one(redis_url: str, tmp_path: Path) -> None:
    missing = tmp_path / "abnormal-missing.csv"
    normal = tmp_path / "normal.csv"  # present, so the error must be about the other file
    normal.write_text("1,2,3,4,5\n6,7,8,9,10\n")
    proc = fedq("run", "--normal-csv", str(normal), "--abnormal-csv", str(missing),
                "--clients", "2", "--rounds", "1", "--out", str(tmp_path / "out"), env=_env(redis_url))
    assert_error_line(proc, "not found", str(missing))


def test_run_with_unknown_label_column_lists_the_columns(redis_url: str, tmp_path: Path,
                                                         labelled_csv: Path) -> None:
    proc = fedq("run", "--csv", str(labelled_csv), "--label-column", "nope", "--clients", "2", "--rounds", "1",
                "--out", str(tmp_path / "out"), env=_env(redis_url))
    line = assert_error_line(proc, "nope")
    for column in [*FEATURES, "label"]:
        assert column in line, f"available column {column!r} not listed in {line!r}"


def test_run_csv_without_label_column_is_a_usage_error(redis_url: str, tmp_path: Path,
                                                       labelled_csv: Path) -> None:
    proc = fedq("run", "--csv", str(labelled_csv), "--out", str(tmp_path / "out"), env=_env(redis_url))
    assert_usage_error(proc, "--label-column")


def test_run_normal_csv_without_abnormal_csv_is_a_usage_error(redis_url: str, tmp_path: Path) -> None:
    proc = fedq("run", "--normal-csv", str(tmp_path / "X.csv"), "--out", str(tmp_path / "out"),
                env=_env(redis_url))
    assert_usage_error(proc, "--abnormal-csv")


def test_run_abnormal_csv_without_normal_csv_is_a_usage_error(redis_url: str, tmp_path: Path) -> None:
    proc = fedq("run", "--abnormal-csv", str(tmp_path / "X.csv"), "--out", str(tmp_path / "out"),
                env=_env(redis_url))
    assert_usage_error(proc, "--normal-csv")


def test_run_csv_and_seed_pair_together_is_a_usage_error(redis_url: str, tmp_path: Path,
                                                         labelled_csv: Path) -> None:
    proc = fedq("run", "--csv", str(labelled_csv), "--label-column", "label",
                "--normal-csv", str(labelled_csv), "--abnormal-csv", str(labelled_csv),
                "--out", str(tmp_path / "out"), env=_env(redis_url))
    assert_usage_error(proc, "--csv")


def test_run_with_out_below_a_file_fails_cleanly(redis_url: str, tmp_path: Path, labelled_csv: Path) -> None:
    """--out that cannot be a directory is bad input like any other: one line, no traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    proc = fedq("run", "--csv", str(labelled_csv), "--label-column", "label", "--clients", "2",
                "--rounds", "1", "--local-epochs", "1", "--out", str(blocker / "out"), env=_env(redis_url))
    assert_error_line(proc, str(blocker / "out"))


# ---------------------------------------------------------------- fedq client: option errors


def test_client_shard_out_of_range_is_a_usage_error(redis_url: str) -> None:
    proc = fedq("client", "--shard", "3", "--num-shards", "3", env=_env(redis_url))
    line = assert_usage_error(proc, "--shard", "out of range")
    assert "0..2" in line


def test_client_whose_shard_count_differs_from_the_run_is_refused_naming_both(redis_url: str, r: redis.Redis) -> None:
    _queued(r, "three-shards", clients=3)
    proc = fedq("client", "--shard", "0", "--num-shards", "2", "--run", "three-shards", "--once", env=_env(redis_url))
    line = assert_error_line(proc, "--num-shards 2", "3 shards")
    assert "three-shards" in line


def test_a_join_with_another_shard_plan_is_refused_by_the_aggregator(r: redis.Redis, redis_url: str) -> None:
    """Written around the client's own check (an older client, a hand-made join): the aggregator
    refuses it with the reason, and the client finds the verdict under its own key."""
    from fedq.learning.spec import RunSpec
    from fedq.protocol.store import RunStore
    from fedq.roles.aggregator import Aggregator
    from fedq.settings import Settings

    store = RunStore(r, "plan")
    store.create(RunSpec(clients=3, rounds=1, run_id="plan", round_timeout=1, round_retries=0,
                         central_eval=False))  # no Keras model in this process: the run ends joining
    assert store.join("c0", {"shard": 0, "num_shards": 2}, {"count": [1]}) == "requested"
    settings = Settings.from_env(env={}, redis_url=redis_url, block_seconds=0.2)
    state = Aggregator(r, settings, "plan").run()  # nobody else comes: the run fails joining
    assert state["status"] == "failed"
    verdict = store.wait_admitted("c0", timeout=1)
    assert verdict.startswith("shard_plan:") and "2" in verdict and "3 shards" in verdict, verdict
    assert [x["reason"] for x in store.refused()] == ["shard_plan"]


def test_client_csv_without_label_column_is_a_usage_error(redis_url: str, labelled_csv: Path) -> None:
    proc = fedq("client", "--shard", "0", "--once", "--csv", str(labelled_csv), env=_env(redis_url))
    assert_usage_error(proc, "--label-column")


# ---------------------------------------------------------------- Redis unreachable or misconfigured


@pytest.mark.parametrize("args", [
    ["submit", "--clients", "2", "--rounds", "1"],
    ["client", "--shard", "0", "--once"],
    ["status"],
], ids=["submit", "client", "status"])
def test_unreachable_redis_fails_with_one_line(args: list[str]) -> None:
    port = free_port()  # nothing listens there
    proc = fedq("--redis-url", f"redis://127.0.0.1:{port}/0", *args, env=_env(None, FEDQ_CONNECT_TIMEOUT="2"))
    assert_error_line(proc, "cannot reach Redis", f"127.0.0.1:{port}")


def test_unreachable_redis_from_env_names_the_url_without_password() -> None:
    port = free_port()
    proc = fedq("status", env=_env(f"redis://:s3cret@127.0.0.1:{port}/0", FEDQ_CONNECT_TIMEOUT="2"))
    line = assert_error_line(proc, "cannot reach Redis", f"127.0.0.1:{port}")
    assert "s3cret" not in proc.stderr and "s3cret" not in proc.stdout, line


@pytest.mark.parametrize("how", ["flag", "env"])
def test_malformed_redis_url_names_the_setting_and_schemes(how: str) -> None:
    if how == "flag":
        proc = fedq("--redis-url", "http://x", "status", env=_env(None))
    else:
        proc = fedq("status", env=_env("http://x"))
    assert_error_line(proc, "FEDQ_REDIS_URL", "redis://", "http://x")


@pytest.mark.parametrize("url", ["redis://127.0.0.1:notaport/0", "redis://127.0.0.1:99999/0"])
def test_redis_url_with_bad_port_fails_cleanly(url: str) -> None:
    proc = fedq("--redis-url", url, "status", env=_env(None, FEDQ_CONNECT_TIMEOUT="2"))
    assert_error_line(proc, url)


# ---------------------------------------------------------------- settings from the environment


def test_non_numeric_block_seconds_names_the_variable(redis_url: str) -> None:
    proc = fedq("status", env=_env(redis_url, FEDQ_BLOCK_SECONDS="abc"))
    assert_error_line(proc, "FEDQ_BLOCK_SECONDS", "abc")


def test_inconsistent_timeouts_are_rejected(redis_url: str) -> None:
    proc = fedq("status", env=_env(redis_url, FEDQ_BLOCK_SECONDS="5", FEDQ_SOCKET_TIMEOUT="2"))
    assert_error_line(proc, "socket_timeout", "block_seconds")


def test_bad_log_level_from_env_is_a_usage_error(redis_url: str) -> None:
    proc = fedq("status", env=_env(redis_url, FEDQ_LOG_LEVEL="verbose"))
    assert_usage_error(proc, "verbose")


# ---------------------------------------------------------------- submit, status, report


def test_submit_then_status_lists_every_run_and_shows_one_queued(redis_url: str, r: redis.Redis) -> None:
    """One set of submitted runs for the listing, one run's view, and an unknown run's error
    (some other run exists): three submits rather than one per check (each loads the data)."""
    run_id = _submit(redis_url)
    assert RUN_ID.match(run_id), run_id
    assert r.zscore("fedq:runs", run_id) is not None
    assert r.hget(f"fedq:{{{run_id}}}:state", "status") == b"queued"
    ids = [run_id, *(_submit(redis_url, "--run-id", f"run-{k}") for k in range(2))]
    assert ids[1:] == ["run-0", "run-1"]

    proc = fedq("status", env=_env(redis_url))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    # The listing is where users find run ids: the whole id must be readable, not cut short.
    for listed in ids:
        assert listed in proc.stdout, proc.stdout
    assert "queued" in proc.stdout

    proc = fedq("status", "--run", run_id, env=_env(redis_url))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"run {run_id}: queued" in proc.stdout, proc.stdout

    assert_error_line(fedq("status", "--run", "nosuchrun", env=_env(redis_url)), "no run", "nosuchrun")


def test_status_with_invalid_run_id_fails(redis_url: str) -> None:
    proc = fedq("status", "--run", "bad{id", env=_env(redis_url))
    assert_error_line(proc, "run id")


def test_report_of_unknown_run_fails_without_writing(redis_url: str, tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = fedq("report", "--run", "nosuchrun", "--out", str(out), env=_env(redis_url))
    assert_error_line(proc, "no run", "nosuchrun")
    assert not (out / "report.json").exists()


def _queued(r: redis.Redis, run_id: str, clients: int = 2) -> str:
    """A queued run, created through the store as `fedq submit` creates it (no process)."""
    from fedq.learning.spec import RunSpec
    from fedq.protocol.store import RunStore

    RunStore(r, run_id).create(RunSpec(clients=clients, rounds=2, run_id=run_id))
    return run_id


def test_report_with_out_below_a_file_fails_cleanly(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    run_id = _queued(r, "to-report")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    proc = fedq("report", "--run", run_id, "--out", str(blocker / "out"), env=_env(redis_url))
    assert_error_line(proc, str(blocker / "out"))


@pytest.mark.parametrize("bad", ["bad id{", "a:b", "-leading-dash", "x" * 65])
def test_submit_with_invalid_run_id_fails_and_stores_nothing(redis_url: str, r: redis.Redis, bad: str) -> None:
    proc = fedq("submit", f"--run-id={bad}", env=_env(redis_url))
    if proc.returncode == 2:
        assert_usage_error(proc, "run id")
    else:
        assert_error_line(proc, "run id")
    assert proc.stdout.strip() == ""
    assert r.zcard("fedq:runs") == 0
    assert not r.keys("fedq:*")


def test_submit_with_taken_run_id_fails_and_keeps_the_first(redis_url: str, r: redis.Redis) -> None:
    assert _submit(redis_url, "--run-id", "same-run") == "same-run"
    proc = fedq("submit", "--clients", "5", "--rounds", "9", "--run-id", "same-run", env=_env(redis_url))
    assert_error_line(proc, "same-run", "exists")
    assert r.hget("fedq:{same-run}:state", "clients") == b"2"
    assert r.zcard("fedq:runs") == 1


def test_submit_with_out_of_range_option_is_a_usage_error(redis_url: str, r: redis.Redis) -> None:
    proc = fedq("submit", "--round-timeout", "-1", env=_env(redis_url))
    assert_usage_error(proc, "--round-timeout")
    assert r.zcard("fedq:runs") == 0


@pytest.mark.parametrize("args, needle", [
    (["--test-fraction", "1.5"], "test_fraction"),
    (["--learning-rate", "0"], "learning rate"),
    (["--min-clients", "3", "--clients", "2"], "min clients"),
])
def test_submit_with_invalid_spec_values_fails(redis_url: str, r: redis.Redis, args: list[str],
                                               needle: str) -> None:
    proc = fedq("submit", *args, env=_env(redis_url))
    assert_error_line(proc, needle)
    assert r.zcard("fedq:runs") == 0
