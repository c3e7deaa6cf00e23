"""Hand-written mutants of the store's Lua steps: each one must fail the guarantee tests.

Python mutation tools (mutmut) do not mutate the Lua inside fedq/protocol/scripts.py's strings, so the
fences and round checks are mutated here: the script text is patched (one small breaking change),
every store check of test_guarantees runs against a real Redis, and at least one must fail. A
mutant that no longer matches its script fails too, so that a rewrite of the scripts brings this
list up to date instead of silently testing nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import redis
import test_guarantees as g

from fedq.protocol import scripts

FENCE = r"^if [^\n]*redis\.call\('GET', [^\n]*\) ~= [^\n]* then return -1 end\n"

# (script, pattern, replacement): each pattern must match exactly once in its script.
MUTANTS: dict[str, tuple[str, str, str]] = {
    "commit: no lease fence": ("COMMIT", FENCE, ""),
    "commit: fence inverted": ("COMMIT", r"(redis\.call\('GET', [^\n]*\)) ~= ([^\n]* then return -1)", r"\1 == \2"),
    "commit: not only on top of the previous round": ("COMMIT", r"^if tonumber\(st\[3\]\) \+ 1 ~= [^\n]*\n", ""),
    "commit: skips a round": ("COMMIT", r"\+ 1 ~= a\.round", "+ 2 ~= a.round"),
    "commit: may run ahead": ("COMMIT", r"\+ 1 ~= (a\.round)", r"+ 1 > \1"),
    "commit: a replay counts as done": ("COMMIT", r"(\+ 1 ~= a\.round) then return 0 end", r"\1 then return 1 end"),
    "commit: outside training": ("COMMIT",
                                 r"^if st\[1\] ~= STATUS_RUNNING or st\[2\] ~= PHASE_TRAIN then return 0 end\n", ""),
    "close: no lease fence": ("CLOSE", FENCE, ""),
    "close: any round": ("CLOSE", r"^if cur \+ 1 ~= [^\n]*\n", ""),
    "open_training: no lease fence": ("OPEN_TRAINING", FENCE, ""),
    "open_training: outside joining": ("OPEN_TRAINING", r"^if \(st\[1\][^\n]*then return 0 end\n", ""),
    "finish_evaluation: no lease fence": ("FINISH_EVAL", FENCE, ""),
    "finish_evaluation: any round": ("FINISH_EVAL", r" or tonumber\(st\[3\]\) ~= a\.round", ""),
    "finish_evaluation: outside evaluation": ("FINISH_EVAL", r" or st\[2\] ~= PHASE_EVAL", ""),
    "fail: no lease fence": ("FAIL", FENCE, ""),
    "admit: no lease fence": ("ADMIT", FENCE, ""),
    "admit: past the member cap": ("ADMIT", r"^if redis\.call\('SCARD'[^\n]*\n[^\n]*\n\s*return 0\nend\n", ""),
    "renew: for anyone": ("RENEW", r"^if redis\.call\('GET', KEYS\[1\]\) == ARGV\[1\] then", "if true then"),
    "release: for anyone": ("RELEASE", r"^if redis\.call\('GET', KEYS\[1\]\) == ARGV\[1\] then", "if true then"),
    "push: into a closed round": ("PUSH", r"a\.round <= math\.max", "a.round < math.max"),
    "push: into a round not yet open": ("PUSH", r"a\.round > committed \+ 1", "a.round > committed + 2"),
    "push: from a stranger": ("PUSH", r"'SISMEMBER', a\.members, a\.client\) == 0",
                              "'SISMEMBER', a.members, a.client) == 2"),
}


def _checks() -> list[tuple[str, Callable[[redis.Redis], None]]]:
    """The store checks of test_guarantees, each a call on a freshly emptied Redis."""
    stale = g.test_a_driver_whose_lease_was_taken_over_is_refused_and_changes_nothing
    out_of_order = g.test_a_commit_that_skips_or_replays_a_round_is_refused_and_changes_nothing
    out: list[tuple[str, Callable[[redis.Redis], None]]] = [
        (f"stale {step}", lambda r, step=step: stale(r, step)) for step in g.STALE_STEPS]
    out += [(f"out of order {a}", lambda r, a=a: out_of_order(r, a)) for a in (0, 1, 3, 4)]
    for fn in (g.test_a_stale_driver_cannot_open_training, g.test_a_stale_driver_cannot_finish_the_evaluation,
               g.test_a_stale_driver_cannot_fail_the_run_nor_touch_the_new_lease,
               g.test_a_store_that_never_held_the_lease_cannot_commit,
               g.test_a_commit_applies_on_top_of_the_previous_round_exactly_once, g.test_no_commit_outside_training,
               g.test_training_opens_once_and_evaluation_finishes_only_in_its_phase,
               g.test_finish_evaluation_only_for_the_last_committed_round,
               g.test_closing_a_round_stops_pushes_for_it_and_only_the_open_round_closes,
               g.test_a_push_is_only_for_the_open_round, g.test_a_stale_driver_cannot_admit_past_the_member_cap):
        out.append((fn.__name__, fn))
    return out


def _failures(r: redis.Redis) -> list[str]:
    failed = []
    for name, check in _checks():
        r.flushall()
        try:
            check(r)
        except (Exception, pytest.fail.Exception) as exc:  # pytest.raises' own failure is no Exception
            failed.append(f"{name}: {type(exc).__name__}")
    return failed


def test_the_unmutated_scripts_pass_every_check(r: redis.Redis) -> None:
    assert _failures(r) == []


@pytest.mark.parametrize("mutant", MUTANTS)
def test_each_lua_mutant_fails_a_guarantee_test(r: redis.Redis, monkeypatch: pytest.MonkeyPatch, mutant: str) -> None:
    script, pattern, replacement = MUTANTS[mutant]
    text = getattr(scripts, script)
    mutated, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert count == 1, f"mutant {mutant!r} matches {count} places in {script}: bring it up to date with the script"
    monkeypatch.setattr(scripts, script, mutated)  # RunStore registers the scripts it finds there
    assert _failures(r), f"mutant {mutant!r} survived: no guarantee test fails with it"
