"""The adversarial suite: one ACL-enforcing Redis for the module, and a table at the end."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from arena import ROWS, Arena


@pytest.fixture(scope="module")
def arena(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Arena]:
    a = Arena(tmp_path_factory.mktemp("arena"))
    yield a
    a.close()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not ROWS:
        return
    tr = terminalreporter
    tr.section("adversarial suite")
    head = (f"{'attack':<34} {'outcome':<30} {'run':<9} {'honest lost':>11} {'mallory accepted':>16} "
            f"{'read MB':>8} {'bound MB':>8}")
    tr.write_line(head)
    for row in ROWS:
        tr.write_line(f"{row['attack']:<34} {row['outcome']:<30} {row['run']:<9} {row['lost']:>11} "
                      f"{row['accepted']:>16} {row['read'] / 2**20:>8.2f} {row['bound'] / 2**20:>8.2f}")
