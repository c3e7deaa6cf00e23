"""The summary tables the fault and adversarial suites print at the end of a session."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# (heading, row key, width, format): a negative width aligns left.
Column = tuple[str, str, int, str]


def print_table(terminalreporter: Any, title: str, columns: Sequence[Column], rows: Sequence[dict[str, Any]]) -> None:
    """A titled section with one line per row; nothing when there are no rows."""
    if not rows:
        return
    terminalreporter.section(title)

    def cell(text: str, width: int) -> str:
        return f"{text:<{-width}}" if width < 0 else f"{text:>{width}}"

    terminalreporter.write_line(" ".join(cell(head, width) for head, _key, width, _fmt in columns))
    for row in rows:
        terminalreporter.write_line(" ".join(cell(format(row[key], fmt), width) for _h, key, width, fmt in columns))
