"""Shared fixtures, all built from the support package (tests/support/)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from support import table
from support.federation import Federation
from support.redis import RedisServer

from fedq.learning.spec import RunSpec


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server of the tests' own, on a free 127.0.0.1 port (one per test process)."""
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture()
def redis_url(redis_server: RedisServer) -> str:
    """URL of the tests' Redis, emptied before each test."""
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture()
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture()
def federation_factory(r: redis.Redis, redis_url: str) -> Iterator[Callable[..., Federation]]:
    """make(spec, join=True, **settings) -> Federation on the tests' Redis; all closed after."""
    made: list[Federation] = []

    def make(spec: RunSpec, join: bool = True, state_rows: bool = True, **settings: Any) -> Federation:
        fed = Federation(r, redis_url, spec, join=join, state_rows=state_rows, **settings)
        made.append(fed)
        return fed

    yield make
    for fed in made:
        fed.close()


@pytest.fixture()
def harness_factory(federation_factory: Callable[..., Federation]) -> Callable[..., Federation]:
    """make(rounds, run_id, spec_extra=None, **settings): three clients c0, c1, c2 that state no
    row counts (any sample count is theirs to claim), a 60 s round timeout (it only bounds a
    failure), the rest of the spec from spec_extra."""

    def make(rounds: int, run_id: str, spec_extra: dict[str, Any] | None = None, **settings: Any) -> Federation:
        spec = RunSpec(clients=3, rounds=rounds, round_timeout=60, run_id=run_id, **(spec_extra or {}))
        return federation_factory(spec, state_rows=False, **settings)

    return make


# --- the suites' summary tables (support.table), printed once at the end, also under xdist ---
def pytest_sessionfinish(session: pytest.Session) -> None:
    out = getattr(session.config, "workeroutput", None)  # set in an xdist worker only
    if out is not None:
        out["fedq_tables"] = table.TABLES


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist, in the controller: a worker finished; keep the tables it made."""
    table.merge(getattr(node, "workeroutput", {}).get("fedq_tables", {}))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    table.print_tables(terminalreporter)
