"""The summary tables the fault and adversarial suites print at the end of a session.

A suite adds rows with ``add_row(title, columns, row)``. tests/conftest.py prints every table at
the end of the session, also under pytest-xdist: each worker hands its tables to the controller
(``workeroutput``), which merges them (``merge``) and prints them (``print_tables``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# (heading, row key, width, format): a negative width aligns left.
Column = tuple[str, str, int, str]

# title -> {"columns": [Column, ...], "rows": [row, ...]}: plain data, so it crosses to the controller.
TABLES: dict[str, dict[str, list[Any]]] = {}


def add_row(title: str, columns: Sequence[Column], row: Mapping[str, Any]) -> None:
    """One row of the table ``title`` (made with these columns on its first row)."""
    table = TABLES.setdefault(title, {"columns": [tuple(c) for c in columns], "rows": []})
    table["rows"].append(dict(row))


def merge(tables: Mapping[str, Mapping[str, Sequence[Any]]]) -> None:
    """Add the tables a worker process made to this process's."""
    for title, table in tables.items():
        for row in table["rows"]:
            add_row(title, table["columns"], row)


def print_tables(terminalreporter: Any) -> None:
    """Every table with rows, in the order their first rows came."""
    for title, table in TABLES.items():
        print_table(terminalreporter, title, [tuple(c) for c in table["columns"]], table["rows"])


def print_table(terminalreporter: Any, title: str, columns: Sequence[Column],
                rows: Sequence[Mapping[str, Any]]) -> None:
    """A titled section with one line per row; nothing when there are no rows."""
    if not rows:
        return
    terminalreporter.section(title)

    def cell(text: str, width: int) -> str:
        return f"{text:<{-width}}" if width < 0 else f"{text:>{width}}"

    terminalreporter.write_line(" ".join(cell(head, width) for head, _key, width, _fmt in columns))
    for row in rows:
        terminalreporter.write_line(" ".join(cell(format(row[key], fmt), width) for _h, key, width, fmt in columns))
