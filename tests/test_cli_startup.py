"""What a `fedq` process loads before it does anything: the tests start hundreds of them, and a
client, a status or a dashboard has no use for pandas, scikit-learn or TensorFlow.

Each check runs in a fresh interpreter and names the heavy modules it found in sys.modules.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support.procs import ROOT, cli_env

from fedq.learning import choices, privacy, spec, staleness, strategies
from fedq.protocol import compress, vocabulary

# Machine learning and its data stack: never needed to parse options or to read Redis.
HEAVY = ("pandas", "sklearn", "scipy", "tensorflow", "keras", "matplotlib", "kubernetes")


def _loaded(argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    """The modules of HEAVY (and numpy) that `fedq argv...` imported, run in a fresh interpreter."""
    code = ("import json, sys\n"
            "from fedq.cli import main\n"
            f"try:\n    main({argv!r}, prog_name='fedq')\n"
            "except SystemExit:\n    pass\n"
            f"print(json.dumps(sorted(m for m in {(*HEAVY, 'numpy')!r} if m in sys.modules)))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=env or cli_env(), stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    loaded: list[str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return loaded


@pytest.mark.parametrize("command", ["status", "submit", "aggregator", "client", "dashboard", "run", "report"])
def test_parsing_a_command_loads_no_machine_learning_nor_numpy(command: str) -> None:
    assert _loaded([command, "--help"]) == []


def test_a_status_against_redis_loads_no_machine_learning(redis_url: str) -> None:
    assert not set(_loaded(["status"], cli_env(redis_url))) & set(HEAVY)


def test_the_cli_choices_are_those_the_implementations_know() -> None:
    # fedq.learning.choices lets the CLI offer them without importing the code behind them.
    assert choices.STRATEGIES == strategies.STRATEGIES
    assert (spec.OPTIMIZERS, spec.AGGREGATIONS) == (choices.OPTIMIZERS, choices.AGGREGATIONS)
    assert (staleness.WEIGHTS, privacy.MODES) == (choices.STALENESS_WEIGHTS, choices.DP_MODES)
    assert compress.ENCODINGS == vocabulary.ENCODINGS
