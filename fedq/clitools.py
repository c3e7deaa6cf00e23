"""Error handling shared by the CLI's command modules: one clear line, never a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click
import redis

from fedq.errors import FedqError

EXIT_ERROR = 1


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
            except redis.RedisError as exc:
                click.echo(f"error: Redis: {exc}", err=True)
            except OSError as exc:  # e.g. an --out directory that cannot be created
                click.echo(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
            sys.exit(EXIT_ERROR)
        return wrapper
    return deco(fn) if fn is not None else deco
