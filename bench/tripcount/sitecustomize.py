"""Counts Redis round trips (bench/round_trips.py puts this folder on a federation's PYTHONPATH).

Every send to Redis (a command, a pipeline, a MULTI) is one line in FEDQ_TRIPS_DIR/<pid>.log:
the time, the commands sent, and the fedq functions that sent them. Forked children (rq's work
horse) write their own file. Without FEDQ_TRIPS_DIR nothing is patched.
"""

from __future__ import annotations

import os
import re
import sys
import time

_DIR = os.environ.get("FEDQ_TRIPS_DIR")
_COMMAND = re.compile(rb"\*\d+\r\n\$\d+\r\n([A-Za-z]+)\r\n(?:\$40\r\n([0-9a-f]{8}))?")


def _install() -> None:
    from redis import connection

    files: dict[int, object] = {}
    original = connection.AbstractConnection.send_packed_command

    def who() -> str:
        frame, names = sys._getframe(2), []
        while frame is not None and len(names) < 4:
            path = frame.f_code.co_filename
            if "/fedq/" in path and "tripcount" not in path:
                names.append(f"{os.path.basename(path)[:-3]}.{frame.f_code.co_name}")
            frame = frame.f_back
        return "<".join(names) or "-"

    def send(self, command, check_health=True):  # type: ignore[no-untyped-def]
        pid = os.getpid()
        out = files.get(pid)
        if out is None:
            out = files[pid] = open(os.path.join(_DIR, f"{pid}.log"), "a", buffering=1)  # noqa: SIM115
        chunks = [command] if isinstance(command, (bytes, str)) else command
        found = [m for c in chunks if isinstance(c, bytes) and len(c) < 1 << 16 for m in _COMMAND.finditer(c)]
        names = [m.group(1).decode().upper() + (f":{m.group(2).decode()}" if m.group(2) else "") for m in found]
        out.write(f"{time.time():.6f} {' '.join(names) or '?'} {who()}\n")  # type: ignore[attr-defined]
        return original(self, command, check_health)

    connection.AbstractConnection.send_packed_command = send  # type: ignore[method-assign]


if _DIR:
    _install()
