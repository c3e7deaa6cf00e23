"""The documentation cannot drift from the code: generated reference pages match a fresh render,
and every `fedq ...` command line shown in README.md and docs/ parses with the real click CLI.

Fast: no Redis, no TensorFlow, nothing is invoked (click's make_context only parses)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, fields
from pathlib import Path

import click
import pytest

from fedq import reference
from fedq.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
GENERATED = {ROOT / rel for rel in reference.pages()}

FENCE = re.compile(r"^(\s*)(```|~~~)([^\n]*)\n(.*?)^\1\2\s*$", re.M | re.S)
INLINE = re.compile(r"(?<!`)`(fedq [^`]+)`(?!`)")
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "zsh"}
ENV_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PLACEHOLDER = re.compile(r"<[^>]*>|…|\.\.\.|^\$|^[A-Z][A-Z0-9_-]*$")
OPERATORS = {"&&", "||", ";", "|", "&", ">", ">>", "<", "<<", "2>", "(", ")"}


@dataclass(frozen=True)
class Shown:
    """One `fedq ...` command line as a page shows it."""

    source: str  # file:line
    text: str
    inline: bool = False  # named in prose (a code span), not a whole command line in a code block

    def __str__(self) -> str:
        return f"{self.source}: {self.text}"


# --- finding command lines ---------------------------------------------------------------------
def _shell_lines(block: str) -> list[tuple[int, str]]:
    """Logical lines of a shell block (continuations joined), with their first line's offset."""
    out: list[tuple[int, str]] = []
    pending, start = "", 0
    for i, raw in enumerate(block.split("\n")):
        line = raw.rstrip()
        if not pending:
            start = i
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    if pending:
        out.append((start, pending))
    return out


def _segments(line: str) -> list[list[str]]:
    """The simple commands of a shell line: split at operators, comments dropped, prompt and
    leading VAR=value assignments removed."""
    line = line.strip()
    if line.startswith("$ "):
        line = line[2:]
    line = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", r"$\1", line)  # $(VAR) as Kubernetes writes it
    lexer = shlex.shlex(line, posix=True, punctuation_chars="&|;<>()")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote: not a shell line
        return []
    segments, current = [], []
    for tok in tokens:
        if tok in OPERATORS or set(tok) <= set("&|;<>()"):
            segments.append(current)
            current = []
        else:
            current.append(tok)
    segments.append(current)
    cleaned = []
    for seg in segments:
        while seg and ENV_ASSIGN.match(seg[0]):
            seg = seg[1:]
        if seg:
            cleaned.append(seg)
    return cleaned


def commands_in(text: str, name: str) -> list[tuple[Shown, list[str]]]:
    """Every `fedq ...` command in the fenced shell blocks and inline code spans of a page, as
    (where it is shown, its arguments after `fedq`)."""
    found: list[tuple[Shown, list[str]]] = []
    for m in FENCE.finditer(text):
        lang = m.group(3).strip().lower()
        if lang not in SHELL_LANGS:
            continue
        first = text.count("\n", 0, m.start(4)) + 1
        for offset, line in _shell_lines(m.group(4)):
            for seg in _segments(line):
                if seg[0] == "fedq":
                    found.append((Shown(f"{name}:{first + offset}", line.strip()), seg[1:]))
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for m in INLINE.finditer(prose):
        span = m.group(1).replace("\\|", "|")
        span = re.sub(r"\[(-[^\]]*)\]", r"\1", span)  # an optional part, written [--opt VALUE]
        for seg in _segments(span):
            if seg[0] == "fedq" and len(seg) > 1:
                found.append((Shown(f"{name}:{text.count(chr(10), 0, m.start()) + 1}", span, inline=True),
                              seg[1:]))
    return found


def all_shown() -> list[tuple[Shown, list[str]]]:
    shown = []
    for path in DOC_FILES:
        if path in GENERATED:  # usage lines there are rendered from the tree itself
            continue
        shown += commands_in(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    return shown


# --- parsing them with the real CLI --------------------------------------------------------------
def _sample(param: click.Parameter, token: str, tmp: Path) -> str:
    """A valid value standing for a placeholder (N, ID, <password>, ...) of this parameter."""
    t = param.type
    if isinstance(t, click.Choice):
        return token if token in t.choices else str(t.choices[0])
    if isinstance(t, (click.IntRange, click.FloatRange)):
        low = t.min if t.min is not None else 0
        value = low + 1 if t.max is None else (low + t.max) / 2
        return str(int(value) if isinstance(t, click.IntRange) else float(value))
    if t.name == "integer":
        return "1"
    if t.name == "float":
        return "1.0"
    if isinstance(t, click.Path) and not t.dir_okay:
        file = tmp / "a-file"
        file.touch()
        return str(file)
    return str(tmp)


def _fill_placeholders(cmd: click.Command, args: list[str], tmp: Path) -> list[str]:
    """Args with placeholder values replaced by valid ones of the option they follow; and values of
    path options that must exist pointed at a path that does (the docs name files of the reader)."""
    by_name = {opt: p for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
    out, expect = [], None
    arguments = [p for p in cmd.params if isinstance(p, click.Argument)]
    for tok in args:
        if expect is None and tok in ("...", "…"):  # "and more options"
            continue
        if expect is not None:
            must_exist = isinstance(expect.type, click.Path) and expect.type.exists
            out.append(_sample(expect, tok, tmp) if PLACEHOLDER.search(tok) or must_exist else tok)
            expect = None
            continue
        name = tok.split("=", 1)[0]
        p = by_name.get(name)
        if p is not None and isinstance(p, click.Option) and not p.is_flag and "=" not in tok:
            expect = p
        if p is None and not tok.startswith("-") and PLACEHOLDER.search(tok) and arguments:
            tok = _sample(arguments[0], tok, tmp)
        out.append(tok)
    return out


def parse(args: list[str], tmp: Path) -> click.Context:
    """Parse `fedq ARGS` down to the last sub-command with strict checks, invoking nothing."""
    cmd: click.Command = main
    ctx: click.Context | None = None
    path = ["fedq"]
    while True:
        args = _fill_placeholders(cmd, args, tmp)
        if isinstance(cmd, click.Group) and not args:
            return ctx or click.Context(cmd)  # a group named on its own, as prose does: `fedq k8s`
        ctx = cmd.make_context(" ".join(path), list(args), parent=ctx, resilient_parsing=False)
        if not isinstance(cmd, click.Group):
            return ctx
        left = getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])
        rest = [*left, *ctx.args]  # what the group left to its sub-command
        if not rest:
            return ctx
        name, sub, args = cmd.resolve_command(ctx, rest)
        assert sub is not None and name is not None
        cmd = sub
        path.append(name)


def check(args: list[str], tmp: Path, complete: bool = True) -> str | None:
    """None when the command line parses, else click's message. complete=False (a command named in
    prose, such as `fedq report` or `fedq k8s manifest --tls-secret`) still checks every command and
    option name and every value given, but not that required options and values are all there."""
    try:
        parse(args, tmp)
    except click.exceptions.Exit:  # --help, --version
        return None
    except click.MissingParameter as exc:
        return None if not complete else exc.format_message()
    except click.BadOptionUsage as exc:
        if not complete and "requires an argument" in exc.format_message():
            return None
        return exc.format_message()
    except click.ClickException as exc:
        return exc.format_message()
    return None


SHOWN = all_shown()


def test_pages_show_commands() -> None:
    """The finder finds the README's set-up command and many more (a guard against a finder that
    silently matches nothing)."""
    texts = [s.text for s, _ in SHOWN]
    assert any(t.startswith("pip install . && fedq run") for t in texts)
    assert len(SHOWN) > 60


@pytest.mark.parametrize("shown,args", SHOWN, ids=[str(s) for s, _ in SHOWN])
def test_documented_command_parses(shown: Shown, args: list[str], tmp_path: Path) -> None:
    problem = check(args, tmp_path, complete=not shown.inline)
    assert problem is None, f"{shown}\n  fedq rejects it: {problem}"


# --- the checker itself ------------------------------------------------------------------------------
PAGE = """\
Text with `fedq status --run ID --watch` inline.

```bash
export FEDQ_REDIS_URL=redis://h:6379/0
$ fedq run --clients 5 \\
    --rounds 10 --strategy fedadam   # a comment
FEDQ_SIGNING_KEY=client-0.key fedq client --shard $(JOB_COMPLETION_INDEX) --once
pip install . && fedq run --no-such-flag
fedq k8s manifest --clients 3 > fl.yaml
```

```python
fedq run --not-shell
```
"""


def test_finder_handles_continuations_prompts_env_and_operators() -> None:
    found = {" ".join(args): shown.source for shown, args in commands_in(PAGE, "page.md")}
    assert found == {
        "status --run ID --watch": "page.md:1",
        "run --clients 5 --rounds 10 --strategy fedadam": "page.md:5",
        "client --shard $JOB_COMPLETION_INDEX --once": "page.md:7",
        "run --no-such-flag": "page.md:8",
        "k8s manifest --clients 3": "page.md:9",
    }


def test_unknown_option_fails(tmp_path: Path) -> None:
    assert "--no-such-flag" in (check(["run", "--no-such-flag"], tmp_path) or "")
    assert "--no-such-flag" in (check(["run", "--no-such-flag"], tmp_path, complete=False) or "")
    assert check(["report"], tmp_path) is not None and check(["report"], tmp_path, complete=False) is None
    assert "No such option" in (check(["k8s", "up", "--replicas", "3"], tmp_path) or "")
    assert "No such command" in (check(["frobnicate"], tmp_path) or "")


def test_bad_values_fail_and_placeholders_pass(tmp_path: Path) -> None:
    assert check(["run", "--strategy", "fedbogus"], tmp_path) is not None
    assert check(["run", "--clients", "0"], tmp_path) is not None
    assert check(["run", "--clients", "N", "--dp-noise", "Z", "--seed", "S"], tmp_path) is None
    assert check(["keys", "new", "--clients", "N", "--out", "DIR"], tmp_path) is None
    assert check(["client", "--shard", "$JOB_COMPLETION_INDEX", "--run", "$FEDQ_RUN_ID", "--once"], tmp_path) is None
    assert check(["--log-level", "DEBUG", "run"], tmp_path) is None
    assert check(["--help"], tmp_path) is None


# --- generated reference pages ------------------------------------------------------------------------
def test_reference_pages_are_current() -> None:
    stale = reference.stale_pages(ROOT)
    assert not stale, (f"{', '.join(stale)} differ from what the code renders: run "
                       f"`{reference.REGENERATE}` and commit the result")


def test_every_setting_is_described() -> None:
    from fedq.settings import Settings

    names = {f.name for f in fields(Settings)}
    assert set(reference.SETTING_NOTES) <= names, "SETTING_NOTES names a field Settings no longer has"
    assert set(reference.SETTING_EXTRAS) <= names and set(reference.SETTING_GROUPS) <= names
    rendered = reference.render_settings()
    for row in reference.setting_rows():
        assert row[3].strip(". "), f"{row[0]} has no description: add a comment above it in fedq/settings.py"
    for name in names:
        assert f"`FEDQ_{name.upper()}`" in rendered


def test_cli_reference_lists_every_command_and_option() -> None:
    rendered = reference.render_cli()

    def walk(cmd: click.Command, path: str) -> None:
        assert f"## `{path}`" in rendered
        for p in cmd.params:
            for opt in (*p.opts, *p.secondary_opts):
                if isinstance(p, click.Option) and p.name not in ("help", "version"):
                    assert f"`{opt}`" in rendered, f"{path} {opt}"
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(main, "fedq")


def test_docs_name_no_absolute_path_of_a_machine() -> None:
    pattern = re.compile(r"(?<![\w.~])/(home|work|Users|mnt|opt)/")
    for path in DOC_FILES:
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            assert not pattern.search(line), f"{path.relative_to(ROOT)}:{i}: {line}"


def test_relative_links_resolve() -> None:
    link = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")
    for path in DOC_FILES:
        for m in link.finditer(path.read_text(encoding="utf-8")):
            target = m.group(1)
            if re.match(r"[a-z]+:", target):
                continue
            assert (path.parent / target).exists(), f"{path.relative_to(ROOT)}: broken link {target}"
