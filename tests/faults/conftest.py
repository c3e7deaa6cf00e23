"""The fault suite prints a summary table of its scenarios at the end of the session."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from harness import ROWS, Federation
from support.table import print_table


@pytest.fixture()
def federation(tmp_path) -> Iterator[Any]:
    made: list[Federation] = []

    def make(**kw: Any) -> Federation:
        fed = Federation(tmp_path, **kw)
        made.append(fed)
        return fed

    yield make
    for fed in made:
        fed.close()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    print_table(terminalreporter, "fault suite", [
        ("scenario", "scenario", -42, ""), ("outcome", "outcome", -9, ""), ("rounds", "rounds", 6, ""),
        ("accepted", "accepted", 8, ""), ("refused", "refused", 7, ""), ("lost", "lost", 4, ""),
        ("double", "double", 6, ""), ("seconds", "seconds", 7, ".1f")], ROWS)
