"""Shared fixtures: a real redis-server of the tests' own, on a free 127.0.0.1 port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from helpers import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
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
