"""`fedq run --help` and its kin list their forty-odd options in titled panels (fedq.cli.panels.HELP_PANELS):
every option has a panel, each appears under its own panel's title in the help text, and the
commands with few options keep click's single list. Fast: click's test runner, nothing runs."""

from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

from fedq.cli import main
from fedq.cli.panels import HELP_PANELS, OTHER_PANEL, PanelCommand

PANELLED = ["run", "submit", "aggregator", "simulate", "client"]


def _help(*args: str) -> str:
    result = CliRunner().invoke(main, [*args, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output


def _sections(text: str) -> dict[str, str]:
    """Section title -> its body, for the unindented "Title:" lines of a help text."""
    parts = re.split(r"^(\S[^\n]*):\n", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


@pytest.mark.parametrize("name", PANELLED)
def test_every_option_of_a_big_command_has_a_panel(name: str) -> None:
    cmd = main.commands[name]
    assert isinstance(cmd, PanelCommand)
    ctx = click.Context(cmd, info_name=name)
    loose = [p for title, params in cmd.panels(ctx) if title == OTHER_PANEL for p in params]
    assert loose == [cmd.get_help_option(ctx)], \
        f"fedq {name}: give these options a panel in HELP_PANELS: {[p.name for p in loose]}"


@pytest.mark.parametrize("name", PANELLED)
def test_help_lists_each_option_under_its_panel_in_order(name: str) -> None:
    cmd = main.commands[name]
    sections = _sections(_help(name))
    titles = [t for t in sections if t != "Usage: fedq " + name + " [OPTIONS]"]
    expected = [t for t, _ in cmd.panels(click.Context(cmd, info_name=name))]
    assert [t for t in titles if t in (*HELP_PANELS, OTHER_PANEL)] == expected
    for title, params in cmd.panels(click.Context(cmd, info_name=name)):
        for p in params:
            for opt in p.opts:
                assert re.search(rf"^\s+(?:\S+, )?{re.escape(opt)}\b", sections[title], flags=re.M), \
                    f"fedq {name}: {opt} is not under {title!r}"


def test_run_help_shows_the_panels_by_title() -> None:
    sections = _sections(_help("run"))
    for title in ("Data", "Federation", "Client training", "Strategy", "Privacy", "Evaluation", "Transport",
                  "Run control"):
        assert title in sections
    assert "--dp-noise" in sections["Privacy"] and "--dp-noise" not in sections["Strategy"]
    assert "--compression" in sections["Transport"]
    assert "Options" not in sections  # no flat list left


def test_small_commands_keep_one_options_list() -> None:
    sections = _sections(_help("status"))
    assert "Options" in sections and not set(sections) & set(HELP_PANELS)


def test_panel_names_name_real_options() -> None:
    """A name in HELP_PANELS that no panelled command has is a typo or a removed option."""
    names = {p.name for n in PANELLED for p in main.commands[n].params}
    unknown = [n for names_ in HELP_PANELS.values() for n in names_ if n not in names]
    assert not unknown, unknown
