"""The two test lanes are what the README says and what CI runs."""

from __future__ import annotations

import re
import tomllib

from support.procs import ROOT


def _readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Tests"):]
    m = re.search(r"```bash\n(.+?)\n```", section)
    assert m, "README's Tests section has no bash block"
    return m.group(1).strip()


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] == _readme_test_command()


def test_the_command_runs_both_lanes_with_plugins_the_test_extra_installs() -> None:
    cmd = _readme_test_command()
    assert 'pytest -m "not slow"' in cmd and "pytest -m slow" in cmd
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = " ".join(project["project"]["optional-dependencies"]["test"])
    if " -n " in cmd:
        assert "pytest-xdist" in extras
    markers = project["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("slow:") for m in markers)


def test_no_test_module_imports_another() -> None:
    """Shared code lives in tests/support/; a test module importing another runs its tests' module
    code twice and ties suites together."""
    tests = ROOT / "tests"
    modules = {p.stem for p in tests.rglob("test_*.py")}
    offenders = []
    for path in tests.rglob("*.py"):
        for line in path.read_text().splitlines():
            m = re.match(r"\s*(?:from|import)\s+(\w+)", line)
            if m and m.group(1) in modules:
                offenders.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert not offenders, offenders
