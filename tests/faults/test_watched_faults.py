"""The faults an ML engineer watches, as the dashboard's JSON API and `fedq status` show them.

A federation started the way users start it (`fedq submit`, `fedq aggregator`, `fedq client`
processes) on a Redis of its own with an append-only file: one client is SIGKILLed mid-run,
then Redis is stopped for OUTAGE seconds and restarted on the same port. The dashboard must
count the client gone and mark the round closed without it, answer quickly with its "Redis
is unreachable" state while Redis is away, and afterwards show the run finishing with its
first start kept.
"""

from __future__ import annotations

import datetime as dt
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from harness import Federation
from support.cli import fedq, pipe_env
from support.dashboard import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, Dashboard, get_json, http_get
from support.wait import wait_until

pytestmark = pytest.mark.slow

OUTAGE = 20.0  # seconds Redis stays away
ANSWER_WITHIN = 5.0  # the longest a dashboard request may take while Redis is away (a hang would be ~50 s)
PATHS = ("/api/runs/watched", "/api/runs", "/api/health", "/runs/watched")
# What the run page shows a person (when Chromium is there to show it): never reloaded.
PAGE_FACTS = """() => {
  const text = (id) => document.getElementById(id).textContent.trim();
  const rows = {};
  for (const tr of document.querySelectorAll('#clients-table tbody tr[data-client]')) {
    rows[tr.dataset.client] = [...tr.cells].map((td) => td.textContent.trim());
  }
  return {status: text('status'), clients: text('clients-joined'), rounds: text('rounds-done'), rows,
          banner: document.getElementById('banner').hidden ? null : text('banner'),
          resumed: document.getElementById('resumed-fact').hidden ? null : text('resumed'), started: text('started'),
          marks: [...document.querySelectorAll('#chart-accuracy line.mark')].map((l) => l.dataset.kind)};
}"""


@pytest.fixture()
def page(federation: Any) -> Iterator[Any]:
    """A headless Chromium page, or None where Debian's chromium is not installed."""
    if not CHROMIUM.exists():
        yield None
        return
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        tab = browser.new_page(viewport={"width": 1300, "height": 1000})
        errors: list[str] = []
        tab.on("pageerror", lambda exc: errors.append(str(exc)))
        yield tab
        browser.close()
    assert not errors, errors


def _page_shows(page: Any, cond: Any, what: str, shot: str) -> None:
    """Wait until the page's facts satisfy cond (nothing to do without a browser); screenshot."""
    if page is None:
        return
    wait_until(lambda: cond(page.evaluate(PAGE_FACTS)), f"the run page to show {what}", timeout=20,
               detail=lambda: repr(page.evaluate(PAGE_FACTS)))
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"dashboard-watched-{shot}.png"), full_page=True)


def _detail(dash: Dashboard) -> dict[str, Any]:
    status, d = get_json(dash.url("/api/runs/watched"))
    assert status == 200, d
    return d


def _wait_detail(fed: Federation, dash: Dashboard, cond: Any, what: str, timeout: float = 120) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []

    def check() -> bool:
        seen[:] = [_detail(dash)]
        return bool(cond(seen[0]))

    fed.wait(check, what, timeout)
    return seen[0]


def _lose_a_client(fed: Federation, dash: Dashboard, page: Any) -> dict[str, Any]:
    """SIGKILL client-2 after round 1; the API and `fedq status` count it gone, and a round
    closes without it (by liveness or the deadline), marked on the chart."""
    fed.wait_round(1, timeout=300)  # four processes start TensorFlow first: minutes on a loaded machine
    fed.signal("client-2", signal.SIGKILL)
    d = _wait_detail(fed, dash, lambda d: d["alive"] == 2, "the API to count 2 clients alive", 60)
    rows = {c["client_id"]: c for c in d["client_table"]}
    assert (d["clients"], d["joined"]) == (3, 3)
    assert rows["client-2"]["liveness"] == "gone" and rows["client-2"]["alive"] is False
    assert {rows[c]["liveness"] for c in ("client-0", "client-1")} == {"alive"}
    out = fedq("status", "--run", "watched", env=pipe_env(fed.url))
    assert out.returncode == 0, out.stderr
    assert "clients 2/3 alive (3 joined)" in out.stdout, out.stdout
    (line,) = [x for x in out.stdout.splitlines() if x.lstrip().startswith("client-2")]
    assert "gone" in line, out.stdout

    d = _wait_detail(fed, dash, lambda d: any(m["missing"] for m in d["round_metrics"]),
                     "a round to close without client-2")
    closed = [m for m in d["round_metrics"] if m["missing"]]
    first = closed[0]
    assert list(first["missing"]) == ["client-2"] and first["num_updates"] == 2, first
    assert sorted(first["clients"]) == ["client-0", "client-1"]
    marks = {(e["kind"], e["round"]) for e in d["events"]}
    assert ("quorum", first["round"]) in marks, d["events"]
    if "heartbeat" in first["missing"]["client-2"]:
        assert ("lost", first["round"]) in marks, d["events"]
    assert all(len(m["missing"]) <= 1 for m in closed)
    _page_shows(page, lambda f: f["clients"] == "2 / 3 alive (3 joined)" and "gone" in f["rows"]["client-2"]
                and "quorum" in f["marks"], "2 of 3 clients alive, client-2 gone, a quorum mark", "client-lost")
    return d


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")  # as `fedq status` writes it


def _timed_get(dash: Dashboard, path: str) -> tuple[int, bytes, float]:
    t0 = time.monotonic()
    status, body, _ = http_get(dash.url(path), timeout=15)
    return status, body, time.monotonic() - t0


def _redis_away(fed: Federation, dash: Dashboard, page: Any) -> None:
    """Redis SIGKILLed for OUTAGE seconds: every dashboard answer is quick and says so."""
    shown = page.evaluate(PAGE_FACTS)["rounds"] if page is not None else None
    fed.server.kill(signal.SIGKILL)
    _page_shows(page, lambda f: f["banner"] and "Redis is unreachable" in f["banner"] and f["rounds"] == shown,
                "the Redis banner over what it showed", "redis-away")
    answers = []
    t_end = time.monotonic() + OUTAGE
    while time.monotonic() < t_end:
        answers += [(path, *_timed_get(dash, path)) for path in PATHS]
        time.sleep(0.5)
    t0 = time.monotonic()
    out = fedq("status", "--run", "watched", env=pipe_env(fed.url))
    status_took = time.monotonic() - t0
    fed.server.start()
    assert len(answers) >= 4 * len(PATHS), answers
    slowest = max(took for *_, took in answers)
    assert slowest < ANSWER_WITHIN, [(p, s, round(t, 2)) for p, s, _, t in answers if t >= ANSWER_WITHIN]
    for path, status, body, _ in answers:
        if path == "/runs/watched":
            assert status == 200, (path, status)  # the page loads and shows its banner itself
        else:
            assert status == 503 and b"Redis is unreachable" in body, (path, status, body[:200])
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "cannot reach Redis" in out.stderr and status_took < 30, (status_took, out.stderr)


def test_a_killed_client_then_a_redis_outage_as_the_dashboard_and_status_show_them(federation, page,
                                                                                    tmp_path) -> None:
    fed = federation(clients=3, rounds=8, min_clients=2, round_timeout=20, run_id="watched", central_eval=True,
                     redis_args=("--appendonly", "yes", "--appendfsync", "always"))
    fed.env["FEDQ_HEARTBEAT_SECONDS"] = "2"
    dash = Dashboard(fed.url, tmp_path, refresh=0.5)
    try:
        fed.aggregator()
        for k in range(3):
            fed.client(k)
        if page is not None:
            _wait_detail(fed, dash, lambda d: d["status"], "the run to exist", 60)
            page.goto(dash.url("/runs/watched"))
        before = _lose_a_client(fed, dash, page)
        started = before["started_at"]
        assert started and before["status"] == "running" and before["round"] < 8, before
        _redis_away(fed, dash, page)

        state = fed.wait_end(timeout=300)
        audit = fed.audit()
        fed.record("client SIGKILL + Redis away 20 s (watched)", audit)
        assert state["status"] == "finished", state
        assert audit.lost == 0 and audit.double_counted == 0
        d = _wait_detail(fed, dash, lambda d: d["status"] == "finished", "the API to show the run finished", 30)
        assert d["round"] == d["rounds"] == 8
        assert d["started_at"] == started, "the first start is kept"
        assert d["final"]["test_accuracy"] == d["round_metrics"][-1]["test_accuracy"] is not None
        assert all(m["overhead_seconds"] >= 0 for m in fed.store.metrics()), fed.store.metrics()
        # The driver's lease (3 s) lapsed while Redis was away: another driver took the run over.
        assert d["aggregator"]["id"] != before["aggregator"]["id"] and d["resumed_at"] > started, d["aggregator"]
        assert [e["kind"] for e in d["events"] if e["kind"] in ("takeover", "resumed")] == ["takeover"], d["events"]
        # The new driver knows client-2 from the rounds it was counted in: its rounds close
        # once client-2's heartbeat is found expired, not at the 20 s deadline.
        after = [m for m in d["round_metrics"] if m["ended_at"] and m["ended_at"] > d["resumed_at"]]
        assert after and all(m["missing"] == {"client-2": "heartbeat expired"} for m in after), after
        out = fedq("status", "--run", "watched", env=pipe_env(fed.url))
        assert out.returncode == 0 and "watched: finished" in out.stdout, out.stdout + out.stderr
        assert f"started {_when(started)}, resumed {_when(d['resumed_at'])}" in out.stdout, out.stdout
        assert "Traceback" not in dash.text()
        _page_shows(page, lambda f: f["banner"] is None and f["status"] == "finished" and f["rounds"] == "8 / 8"
                    and f["resumed"] == _when(d["resumed_at"]) and f["started"] == _when(started)
                    and "takeover" in f["marks"], "the finished run, resumed, without the banner", "finished")
        for k in range(2):
            assert fed.exit_code(f"client-{k}") == 0, fed.log(f"client-{k}")
    finally:
        dash.stop()
