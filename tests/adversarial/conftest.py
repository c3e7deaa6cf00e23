"""The adversarial suite: one ACL-enforcing Redis for the module (its table is support.table's)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from arena import Arena


@pytest.fixture(scope="module")
def arena(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Arena]:
    a = Arena(tmp_path_factory.mktemp("arena"))
    yield a
    a.close()

