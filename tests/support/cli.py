"""The fedq CLI run to completion, and checks of how it fails."""

from __future__ import annotations

import subprocess

from support.procs import cli_env, fedq_cmd

TIMEOUT = 120  # bounds a hung command only


def pipe_env(redis_url: str | None, **extra: str) -> dict[str, str]:
    """cli_env with output as in a pipe or a container log: no terminal, the common 80 columns."""
    env = cli_env(redis_url)
    env["COLUMNS"] = "80"
    env.pop("LINES", None)
    env.update(extra)
    return env


def fedq(*args: str, env: dict[str, str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run `fedq args...` to completion (no stdin), capturing text output."""
    return subprocess.run(fedq_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def assert_error_line(proc: subprocess.CompletedProcess[str], *needles: str, code: int = 1) -> str:
    """Exit `code`, exactly one non-blank stderr line starting 'error:' that contains every needle."""
    detail = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, detail
    assert proc.returncode == code, detail
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, detail
    line = lines[0]
    assert line.startswith("error:"), detail
    for needle in needles:
        assert needle in line, f"{needle!r} missing from {line!r}"
    return line
