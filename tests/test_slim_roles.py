"""The slim roles run where TensorFlow (and, for the dashboard, pandas, scikit-learn, matplotlib
and the rest that deploy/requirements/dashboard.txt leaves out) cannot be imported: fedq runs in a
child interpreter whose imports of those packages fail as they do when they are not installed
(tests/support/blocked.py). The slow test drives a whole lean run with such an aggregator.
"""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import redis
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from support.blocked import AGGREGATOR_LEAVES_OUT, DASHBOARD_LEAVES_OUT, blocked_fedq, run_blocked
from support.dashboard import make_run
from support.procs import Proc, cli_env, fedq_cmd

from fedq.protocol.store import RunStore
from fedq.roles.report import build_report


def test_fedq_status_runs_without_machine_learning_packages(redis_url: str, r: redis.Redis) -> None:
    make_run(r, "slim-run", rounds=2, committed=2)
    for args in (["status"], ["status", "--run", "slim-run"]):
        proc = subprocess.run(blocked_fedq(DASHBOARD_LEAVES_OUT, args), env=cli_env(redis_url, COLUMNS="200"),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "slim-run" in proc.stdout and "finished" in proc.stdout, proc.stdout


def test_the_dashboard_and_a_lean_aggregator_import_without_what_they_leave_out(redis_url: str,
                                                                                r: redis.Redis) -> None:
    make_run(r, "slim-dash", rounds=2, committed=1)
    dashboard = run_blocked(DASHBOARD_LEAVES_OUT, f"""
import json
from fedq.ops.dashboard.app import create_app
from fedq.protocol.connection import connect
from fedq.settings import Settings
client = create_app(connect(Settings.from_env(redis_url={redis_url!r}))).test_client()
print(json.dumps([client.get("/api/health").status_code, client.get("/api/runs").get_json()]))
""")
    assert dashboard.returncode == 0, dashboard.stderr
    health, runs = json.loads(dashboard.stdout)
    assert health == 200 and "slim-dash" in json.dumps(runs)

    aggregator = run_blocked(AGGREGATOR_LEAVES_OUT, """
import sys
import fedq.cli, fedq.roles.jobs
from fedq.errors import ConfigError
from fedq.learning.models import keras_installed
from fedq.roles.initial import need_tensorflow
assert not keras_installed()
try:
    need_tensorflow("run-x")
except ConfigError as exc:
    print(exc)
print(sorted(m for m in sys.modules if m.split('.')[0] in {'tensorflow', 'keras', 'matplotlib', 'flask'}))
""")
    assert aggregator.returncode == 0, aggregator.stderr
    why, loaded = aggregator.stdout.splitlines()
    assert "no TensorFlow" in why and "fedq submit" in why
    assert loaded == "[]"


@pytest.mark.slow
def test_a_lean_run_whose_aggregator_has_no_tensorflow_finishes(redis_url: str, r: redis.Redis,
                                                                  tmp_path: Path) -> None:
    env = cli_env(redis_url)
    sub = subprocess.run(fedq_cmd("submit", "--clients", "2", "--rounds", "2", "--local-epochs", "1",
                                  "--no-central-eval", "--run-id", "lean-slim"),
                         env=env, capture_output=True, text=True, timeout=180)
    assert sub.returncode == 0, sub.stderr
    store = RunStore(r, "lean-slim")
    assert store.initial_payload() is not None, "a lean run's submitter stores its initial model"
    procs = [Proc(f"client-{k}", ["client", "--shard", str(k), "--run", "lean-slim", "--once"], env, tmp_path)
             for k in range(2)]
    procs.append(Proc("aggregator", blocked_fedq(AGGREGATOR_LEAVES_OUT, ["aggregator", "--burst"]),
                      env, tmp_path, raw=True))
    try:
        for p in procs:
            assert p.wait(timeout=300) == 0, p.text()[-3000:]
    finally:
        for p in procs:
            p.stop()
    state = store.state()
    assert state["status"] == "finished", state
    assert [m["round"] for m in store.metrics()] == [1, 2]
    assert store.initial_payload() is None, "committed, the submitted initial model is dropped"
    log = procs[-1].text()
    assert "the initial model came with the run" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    # Each client logged what it trains on, and the report records it per client.
    assert "client-0 trains on CPU:0" in procs[0].text()
    devices = {cid: c["devices"] for cid, c in build_report(store)["client_data"].items()}
    assert sorted(devices) == ["client-0", "client-1"] and all("CPU:0" in d for d in devices.values()), devices


# --- the role files agree with pyproject.toml and the constraints ---------------------------------
REQUIREMENTS = Path(__file__).resolve().parents[1] / "deploy" / "requirements"


def _requirements(path: Path) -> list[Requirement]:
    lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [Requirement(line) for line in lines if line]


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((REQUIREMENTS.parents[1] / "pyproject.toml").read_text())["project"]


def test_the_full_file_is_pyprojects_dependencies_and_roles_take_a_subset_of_them() -> None:
    base = [Requirement(d) for d in _pyproject()["dependencies"]]
    assert [str(r) for r in _requirements(REQUIREMENTS / "full.txt")] == [str(r) for r in base]
    gpu = [str(Requirement(d)) for d in _pyproject()["optional-dependencies"]["gpu"]]
    allowed = {str(r) for r in base}
    for name in ("dashboard.txt", "aggregator.txt", "client-gpu.txt"):
        for req in _requirements(REQUIREMENTS / name):
            if req.name == "tensorflow" and "and-cuda" in req.extras:  # the gpu extra's, without its marker
                assert any(g.startswith(f"tensorflow[and-cuda]{req.specifier}") for g in gpu), (req, gpu)
                continue
            assert str(req) in allowed, f"{name}: {req} is not one of pyproject.toml's dependencies"
    left_out = {"dashboard.txt": {"tensorflow", "tensorflow-cpu", "pandas", "scikit-learn", "matplotlib", "rq"},
                "aggregator.txt": {"tensorflow", "tensorflow-cpu", "matplotlib", "flask"},
                "client-gpu.txt": {"tensorflow-cpu"}}
    for name, names in left_out.items():
        assert not names & {r.name.lower() for r in _requirements(REQUIREMENTS / name)}, name


def test_every_required_package_is_pinned_in_the_constraints() -> None:
    pins = {}
    for req in _requirements(REQUIREMENTS / "constraints.txt"):
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"constraints.txt: {req} is not a pin"
        pins[canonicalize_name(req.name)] = spec[0].version
    for path in REQUIREMENTS.glob("*.txt"):
        for req in _requirements(path):
            name = canonicalize_name(req.name)
            assert name in pins, f"{path.name}: {req.name} has no pin in constraints.txt"
            assert req.specifier.contains(pins[name]), f"{path.name}: {req} excludes the pin {pins[name]}"
    assert pins["tensorflow"] == pins["tensorflow-cpu"], "the CUDA build is the same TensorFlow release"
