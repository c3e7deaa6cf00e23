"""The fault suite's federations (its summary table is support.table's, printed by tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from harness import Federation


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

