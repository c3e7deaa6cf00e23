"""The fault suite's federations (its summary table is support.table's, printed by tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from harness import Federation
from support.initial import PrestoredFederation

from fedq.learning.spec import RunSpec


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


@pytest.fixture()
def prestored_harness(r: redis.Redis, redis_url: str) -> Iterator[Callable[..., PrestoredFederation]]:
    """tests/conftest.py's harness_factory (three clients c0, c1, c2 that state no row counts, a
    60 s round timeout), its run's initial model stored with it (support.initial): the
    aggregator thread starts no child process importing TensorFlow to build it."""
    made: list[PrestoredFederation] = []

    def make(rounds: int, run_id: str, spec_extra: dict[str, Any] | None = None,
             **settings: Any) -> PrestoredFederation:
        spec = RunSpec(clients=3, rounds=rounds, round_timeout=60, run_id=run_id, **(spec_extra or {}))
        fed = PrestoredFederation(r, redis_url, spec, state_rows=False, **settings)
        made.append(fed)
        return fed

    yield make
    for fed in made:
        fed.close()
