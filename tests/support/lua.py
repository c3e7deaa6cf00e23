"""Hand-written mutants of the Lua steps (Python mutation tools leave string constants alone).

A mutant is (script name, regular expression, replacement): one small breaking change to one
script of fedq.protocol.scripts. A test patches it in, runs its checks against a real Redis and
asserts that at least one fails (docs/how-to/mutation-testing.md)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import pytest
import redis

from fedq.protocol import scripts

Check = Callable[[redis.Redis], None]


def mutated(text: str, pattern: str, replacement: str, name: str) -> str:
    """The script text with the mutant's one change; a pattern that does not match exactly once
    fails, so that rewriting a script means rewriting its mutants, not losing them."""
    out, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert count == 1, f"mutant {name!r} matches {count} places: bring it up to date with the script"
    return out


def mutant_failures(r: redis.Redis, checks: Sequence[Check | tuple[str, Check]]) -> list[str]:
    """The checks that fail, each run on a freshly emptied Redis (a check is a test function
    taking the connection, or (name, function))."""
    failed = []
    for item in checks:
        name, check = item if isinstance(item, tuple) else (item.__name__, item)
        r.flushall()
        try:
            check(r)
        except (Exception, pytest.fail.Exception) as exc:  # pytest.raises' own failure is no Exception
            failed.append(f"{name}: {type(exc).__name__}")
    return failed


Mutant = tuple[str, str, str]  # (script name in fedq.protocol.scripts, pattern, replacement)


def assert_killed(r: redis.Redis, monkeypatch: pytest.MonkeyPatch, mutants: dict[str, Mutant], name: str,
                  checks: Sequence[Check | tuple[str, Check]]) -> None:
    """Patch mutant `name` into its script (RunStore registers the scripts it finds there) and
    assert that at least one of the checks fails with it."""
    script, pattern, replacement = mutants[name]
    monkeypatch.setattr(scripts, script, mutated(getattr(scripts, script), pattern, replacement, name))
    assert mutant_failures(r, checks), f"mutant {name!r} survived: no check fails with it"
