"""Connecting to Redis: TLS options, timeouts, reconnect backoff, and URLs fit for messages."""

from __future__ import annotations

from typing import Any

import redis
from redis._parsers import Encoder
from redis.backoff import ExponentialBackoff
from redis.connection import PythonRespSerializer
from redis.driver_info import DriverInfo
from redis.retry import Retry

from fedq.errors import ConfigError, RedisUnavailable
from fedq.settings import Settings


def tls_options(settings: Settings) -> dict[str, Any]:
    """redis-py's TLS arguments for a rediss:// URL: verify the server, present our certificate."""
    if not settings.redis_url.startswith("rediss://"):
        return {}
    opts: dict[str, Any] = {"ssl_cert_reqs": "required"}
    if settings.tls_ca_cert:
        opts["ssl_ca_certs"] = settings.tls_ca_cert
    if settings.tls_cert:
        opts.update(ssl_certfile=settings.tls_cert, ssl_keyfile=settings.tls_key)
    return opts


# Replies are parsed by hiredis (C), but commands are packed by redis-py's own packer, which
# sends a large value as it is: hiredis' packer copies it into one buffer first, which took
# 10 ms of CPU for a 4 MB update where this takes 1 ms.
_PACKER = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)
# What each new connection tells Redis about its library (CLIENT SETINFO), worked out once: left
# to redis-py, every connection reads the installed package's metadata again (half a ms of CPU).
_DRIVER = DriverInfo(lib_version=redis.__version__)


def _client(settings: Settings, retries: int) -> redis.Redis:
    try:
        return redis.Redis.from_url(
            settings.redis_url,
            command_packer=_PACKER,
            driver_info=_DRIVER,
            socket_timeout=settings.socket_timeout,
            socket_connect_timeout=settings.connect_timeout,
            health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=3.0, base=0.1), retries=retries),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            **tls_options(settings),
        )
    except ValueError as exc:
        raise ConfigError(f"bad Redis URL {redact(settings.redis_url)!r}: {exc}") from None


def connect(settings: Settings, check: bool = True) -> redis.Redis:
    """A Redis client for settings.redis_url with timeouts and reconnect backoff.

    The returned client rides out a Redis restart (reconnect_retries with backoff); the
    start-up check does not, so that a wrong URL is reported in seconds."""
    client = _client(settings, settings.reconnect_retries)
    if check:
        probe = _client(settings, retries=3)
        try:
            probe.ping()
        except redis.RedisError as exc:
            raise RedisUnavailable(f"cannot reach Redis at {redact(settings.redis_url)}: {exc}") from None
        finally:
            probe.close()
    return client


def redact(url: str) -> str:
    """The URL with any password replaced, for messages and logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
