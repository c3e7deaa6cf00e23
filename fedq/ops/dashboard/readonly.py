"""A Redis client that can only read: the dashboard and ``fedq status`` never write run state."""

from __future__ import annotations

from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from fedq.errors import ConfigError, FedqError
from fedq.protocol.connection import tls_options
from fedq.settings import Settings

# Every command the read paths use; anything else is refused before it reaches Redis.
READ_COMMANDS = frozenset({
    "GET", "GETRANGE", "MGET", "STRLEN", "EXISTS", "TYPE", "TTL", "PTTL", "SCAN", "MEMORY USAGE",
    "HGET", "HMGET", "HGETALL", "HKEYS", "HLEN", "HEXISTS",
    "SMEMBERS", "SISMEMBER", "SCARD",
    "LRANGE", "LLEN", "LINDEX",
    "ZRANGE", "ZREVRANGE", "ZCARD", "ZSCORE",
    "XRANGE", "XREVRANGE", "XLEN",
    "PING", "INFO", "DBSIZE",
})


class ReadOnlyViolation(FedqError):
    """Code on a read-only path tried to send a command that is not a read."""


class ReadOnlyRedis(redis.Redis):
    """redis.Redis that refuses, client-side, any command outside READ_COMMANDS.

    Scripts and transactions are refused as well; a plain pipeline (a batch of reads) has each
    command checked as it is queued.
    """

    def execute_command(self, *args: Any, **options: Any) -> Any:
        _check(args)
        return super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        if transaction:
            raise ReadOnlyViolation("read-only Redis client refused a transaction")
        return _ReadOnlyPipeline(self.connection_pool, self.response_callbacks, False, shard_hint)


def _check(args: tuple[Any, ...]) -> None:
    name = str(args[0]).upper() if args else ""
    if name not in READ_COMMANDS:
        raise ReadOnlyViolation(f"read-only Redis client refused {name or 'an empty command'}")


class _ReadOnlyPipeline(redis.client.Pipeline):
    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        _check(args)
        return super().execute_command(*args, **kwargs)

    def register_script(self, script: Any) -> Any:
        # RunStore registers its scripts when built; they may exist but can never run.
        return _RefusedScript()


class _RefusedScript:
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ReadOnlyViolation("read-only Redis client refused a script")


def connect_readonly(settings: Settings) -> ReadOnlyRedis:
    """A read-only client that fails fast while Redis is away and reconnects when it returns.

    Unlike the workers' client it does not ride out an outage with long retries: a page
    should say at once that Redis is unreachable, and ask again a moment later.
    """
    try:
        # redis-py annotates from_url as returning Redis, though it builds an instance of cls.
        return cast(ReadOnlyRedis, ReadOnlyRedis.from_url(
            settings.redis_url,
            socket_timeout=min(5.0, settings.socket_timeout),
            socket_connect_timeout=min(2.0, settings.connect_timeout),
            health_check_interval=10,
            # One immediate retry: a connection that died with a Redis restart is replaced.
            retry=Retry(NoBackoff(), retries=1),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            **tls_options(settings),
        ))
    except ValueError as exc:
        raise ConfigError(f"bad Redis URL: {exc}") from None
