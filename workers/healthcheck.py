"""Container health check of every fedq role: exit 0 when this container's settings reach Redis.

The image's HEALTHCHECK runs it; it reads the same FEDQ_* variables as the role's process.
"""

from __future__ import annotations

import sys

import redis

from fedq.errors import FedqError
from fedq.protocol.connection import redact, tls_options
from fedq.settings import Settings


def main() -> int:
    """Ping Redis once with short timeouts (no retries: the health check itself is retried)."""
    try:
        settings = Settings.from_env()
    except FedqError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    try:
        redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=3,
                             **tls_options(settings)).ping()
    except (redis.RedisError, ValueError) as exc:
        print(f"unhealthy: cannot reach Redis at {redact(settings.redis_url)}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
