"""The fault suite prints a summary table of its scenarios at the end of the session."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from harness import ROWS, Federation


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
    if not ROWS:
        return
    tr = terminalreporter
    tr.section("fault suite")
    head = (f"{'scenario':<42} {'outcome':<9} {'rounds':>6} {'accepted':>8} {'refused':>7} {'lost':>4} "
            f"{'double':>6} {'seconds':>7}")
    tr.write_line(head)
    for row in ROWS:
        tr.write_line(f"{row['scenario']:<42} {row['outcome']:<9} {row['rounds']:>6} {row['accepted']:>8} "
                      f"{row['refused']:>7} {row['lost']:>4} {row['double']:>6} {row['seconds']:>7.1f}")
