"""The one polling loop of the tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(cond: Callable[[], Any], what: str, timeout: float = 60.0, *, every: float = 0.05,
               ignore: tuple[type[BaseException], ...] = (), detail: Callable[[], str] | None = None) -> Any:
    """Poll ``cond`` until it returns something truthy, and return that.

    After ``timeout`` seconds, AssertionError "timed out waiting for <what>" (with the last
    ignored error, and ``detail()`` such as process logs, when given). Exceptions of the types
    in ``ignore`` count as "not yet" (a server still starting, a Redis being restarted); any
    other exception, AssertionError included, propagates at once."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except AssertionError:
            raise
        except ignore as exc:
            last = exc
        if time.monotonic() > deadline:
            msg = f"timed out waiting for {what} after {timeout:g} s"
            if last is not None:
                msg += f" (last error: {last!r})"
            if detail is not None:
                msg += "\n" + detail()
            raise AssertionError(msg)
        time.sleep(every)
