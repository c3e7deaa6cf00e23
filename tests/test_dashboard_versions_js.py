"""static/versions.js (the run page's Model versions section) run by node against a stand-in DOM:
hidden for a sync run; for a buffered run, the staleness chart's series and the table's rows.
The browser tests (tests/test_dashboard_layout.py) need chromium; this needs only node."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

NODE = shutil.which("node")
SCRIPT = Path(__file__).resolve().parents[1] / "fedq" / "ops" / "dashboard" / "static" / "versions.js"
pytestmark = pytest.mark.skipif(NODE is None, reason="needs node")

# A DOM of the few calls versions.js makes; prints what it drew and the table's rows as JSON.
HARNESS = """
const fs = require('fs');
function node(tag) {
  return {tag, children: [], textContent: '', className: '', hidden: false,
          appendChild(c) { this.children.push(c); return c; },
          querySelector(sel) { return this.children.find((c) => c.tag === sel); },
          replaceChild(n, o) { this.children[this.children.indexOf(o)] = n; }};
}
const els = {'versions-section': node('section'), 'chart-staleness': node('figure'), 'versions-table': node('table')};
els['versions-section'].hidden = true;
els['versions-table'].appendChild(node('tbody'));
const drawn = [];
global.document = {getElementById: (id) => els[id], createElement: node};
global.window = {fedqChart: {draw: (el, opts) => drawn.push(opts)}};
eval(fs.readFileSync(process.argv[1], 'utf8'));
window.fedqVersions.show(JSON.parse(process.argv[2]));
const rows = els['versions-table'].querySelector('tbody').children.map((tr) => tr.children.map((td) => td.textContent));
console.log(JSON.stringify({hidden: els['versions-section'].hidden, drawn, rows}));
"""


def _show(d: dict) -> dict:
    out = subprocess.run([str(NODE), "-e", HARNESS, str(SCRIPT), json.dumps(d)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_sync_run_shows_no_versions() -> None:
    got = _show({"versions": []})
    assert got == {"hidden": True, "drawn": [], "rows": []}


def test_a_buffered_run_draws_staleness_per_version_and_lists_versions_newest_first() -> None:
    versions = [
        {"version": 1, "num_updates": 2, "staleness_mean": 0.0, "staleness_max": 0, "staleness": {"0": 2},
         "bases": {"0": 2}, "clients": ["c0", "c1"]},
        {"version": 2, "num_updates": 2, "staleness_mean": 0.5, "staleness_max": 1, "staleness": {"0": 1, "1": 1},
         "bases": {"0": 1, "1": 1}, "clients": ["c0", "c2"]},
        {"version": 3, "num_updates": None, "staleness_mean": None, "staleness_max": None, "staleness": {},
         "bases": {}, "clients": []},
    ]
    got = _show({"versions": versions})
    assert not got["hidden"]
    (chart,) = got["drawn"]
    assert chart["xLabel"] == "version"
    assert {s["name"]: s["points"] for s in chart["series"]} == {
        "staleness_mean": [[1, 0, 1], [2, 0.5, 2]], "staleness_max": [[1, 0, 1], [2, 1, 2]]}  # none for version 3
    assert got["rows"] == [
        ["3", "–", "–", "–", "", "", ""],
        ["2", "2", "0.50", "1", "0 behind ×1, 1 behind ×1", "0 ×1, 1 ×1", "c0, c2"],
        ["1", "2", "0.00", "0", "0 behind ×2", "0 ×2", "c0, c1"]]
