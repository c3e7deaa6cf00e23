"""ruff and mypy, configured in pyproject.toml, are clean over the package and the tests.

Both tools run over everything and any finding fails the test. Runs the tools through this
interpreter (python -m ruff / python -m mypy): the test extra installs them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# One finding per line, "path:line:..." (ruff's concise format; mypy's default).
_FINDING = re.compile(r"^(?P<path>[^\s:]+\.py):\d+:")


def _findings(*args: str) -> list[str]:
    """The findings of `python -m <args>`; fails the test when the tool fails without naming one."""
    done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    if "No module named" in output and done.returncode != 0:
        pytest.fail(f"{args[0]} is not installed: pip install -e '.[test]'\n{output}")
    findings = [line for line in output.splitlines() if _FINDING.match(line) and ": note:" not in line]
    if done.returncode != 0 and not findings:
        pytest.fail(f"{' '.join(args)} failed without a finding to blame:\n{output}")
    return findings


def test_ruff_is_clean() -> None:
    findings = _findings("ruff", "check", "--output-format", "concise", "--no-cache", "fedq", "tests")
    assert not findings, "ruff findings:\n" + "\n".join(findings)


@pytest.mark.slow
def test_mypy_is_clean() -> None:
    findings = _findings("mypy", "fedq")
    assert not findings, "mypy findings:\n" + "\n".join(findings)
