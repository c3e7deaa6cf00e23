"""ruff and mypy, configured in pyproject.toml, are clean over the package and the tests.

Both tools run over everything; only errors in NOT_YET_CLEAN are tolerated, and they are printed.
Those files are being rewritten or are owned by other work in flight (issue 14): this list must
shrink to empty; take a file off it as soon as both tools pass on it. Runs the tools through this
interpreter (python -m ruff / python -m mypy): the test extra installs them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Paths (files, or folders ending in "/") whose errors do not fail the test yet. Must shrink to empty.
NOT_YET_CLEAN = [
    # being rewritten
    "fedq/protocol/store.py", "fedq/protocol/transfer.py", "fedq/roles/aggregator.py", "fedq/roles/client.py",
    # observability
    "fedq/ops/dashboard/", "fedq/ops/view.py", "fedq/roles/metrics.py", "fedq/roles/plots.py",
    "tests/test_dashboard_api.py", "tests/test_dashboard_browser.py", "tests/test_dashboard_support.py",
    "tests/test_metrics.py", "tests/test_metrics_e2e.py", "tests/test_plots.py",
    # deployment
    "fedq/ops/k8s.py", "fedq/ops/k8s_apply.py", "fedq/ops/k8s_manifests.py", "fedq/ops/kfp_pipeline.py",
    "fedq/ops/acl.py", "tests/test_acl.py", "tests/deploy_api.py", "tests/deploy_checks.py",
    "tests/deploy_harness.py", "tests/test_deploy_cli.py", "tests/test_deploy_manifests.py",
    "tests/test_deploy_processes.py", "tests/test_deploy_secure.py",
]
# One finding per line, "path:line:..." (ruff's concise format; mypy's default).
_FINDING = re.compile(r"^(?P<path>[^\s:]+\.py):\d+:")


def _tolerated(path: str) -> bool:
    return any(path == p or (p.endswith("/") and path.startswith(p)) for p in NOT_YET_CLEAN)


def _run(*args: str) -> tuple[list[str], list[str], str]:
    """(findings that fail the test, tolerated findings, the whole output) of `python -m <args>`."""
    done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    if "No module named" in output and done.returncode != 0:
        pytest.fail(f"{args[0]} is not installed: pip install -e '.[test]'\n{output}")
    findings = [line for line in output.splitlines() if _FINDING.match(line) and ": note:" not in line]
    bad = [f for f in findings if not _tolerated(f.split(":", 1)[0])]
    ok = [f for f in findings if f not in bad]
    if done.returncode != 0 and not findings:
        pytest.fail(f"{' '.join(args)} failed without a finding to blame:\n{output}")
    return bad, ok, output


def _check(tool: str, bad: list[str], tolerated: list[str]) -> None:
    if tolerated:
        print(f"{tool}: {len(tolerated)} finding(s) left in NOT_YET_CLEAN files:\n" + "\n".join(tolerated))
    assert not bad, f"{tool} findings outside NOT_YET_CLEAN:\n" + "\n".join(bad)


def test_ruff_is_clean() -> None:
    bad, tolerated, _ = _run("ruff", "check", "--output-format", "concise", "--no-cache", "fedq", "tests")
    _check("ruff", bad, tolerated)


@pytest.mark.slow
def test_mypy_is_clean() -> None:
    bad, tolerated, _ = _run("mypy", "fedq")
    _check("mypy", bad, tolerated)


def test_the_tolerated_list_names_real_paths() -> None:
    missing = [p for p in NOT_YET_CLEAN if not (ROOT / p).exists()]
    assert not missing, f"NOT_YET_CLEAN names paths that are gone (drop them): {missing}"
