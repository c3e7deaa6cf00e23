"""Error handling shared by the CLI's command modules: one clear line, never a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from fedq.errors import FedqError

EXIT_ERROR = 1


def _is_redis_error(exc: BaseException) -> bool:
    """Whether exc is redis-py's; redis is not imported for the check (a process that never
    imported it, such as `fedq ... --help`, cannot have met its errors)."""
    redis = sys.modules.get("redis")
    return redis is not None and isinstance(exc, redis.RedisError)


def fail_cleanly(fn: Callable[..., Any] | None = None, *, squash: bool = False) -> Any:
    """Decorator: fedq, Redis and OS errors become 'error: ...' on stderr and exit 1.

    squash=True folds a message onto one line (Kubernetes API errors carry multi-line bodies)."""
    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return f(*args, **kwargs)
            except FedqError as exc:
                text = " ".join(str(exc).split()) if squash else str(exc)
                click.echo(f"error: {text}", err=True)
            except Exception as exc:
                if _is_redis_error(exc):
                    click.echo(f"error: Redis: {exc}", err=True)
                elif isinstance(exc, OSError):  # e.g. an --out directory that cannot be created
                    click.echo(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
                else:
                    raise
            sys.exit(EXIT_ERROR)
        return wrapper
    return deco(fn) if fn is not None else deco
