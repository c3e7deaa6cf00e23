"""The adversarial suite: one ACL-enforcing Redis for the module, and a table at the end."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from arena import ROWS, Arena
from support.table import print_table


@pytest.fixture(scope="module")
def arena(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Arena]:
    a = Arena(tmp_path_factory.mktemp("arena"))
    yield a
    a.close()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    rows = [{**row, "read_mb": row["read"] / 2**20, "bound_mb": row["bound"] / 2**20} for row in ROWS]
    print_table(terminalreporter, "adversarial suite", [
        ("attack", "attack", -34, ""), ("outcome", "outcome", -30, ""), ("run", "run", -9, ""),
        ("honest lost", "lost", 11, ""), ("mallory accepted", "accepted", 16, ""),
        ("read MB", "read_mb", 8, ".2f"), ("bound MB", "bound_mb", 8, ".2f")], rows)
