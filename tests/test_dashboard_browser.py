"""The run page in headless Chromium (Debian's package, driven by Playwright): live while a real
federation runs, ending with the numbers report.json ends with; a banner while Redis is away."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from support.dashboard import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, Dashboard, get_json, make_run
from support.federation import CliFederation
from support.procs import cli_env, fedq_cmd
from support.redis import RedisServer
from support.wait import wait_until

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason=f"needs Debian's chromium at {CHROMIUM} (.ci/run installs it)")

# What the page shows, read the way a person reads it: status badge, chart points, table cells.
PAGE_STATE = """() => {
  const text = (sel) => { const n = document.querySelector(sel); return n ? n.textContent.trim() : null; };
  const points = {};
  for (const c of document.querySelectorAll('figure.chart circle')) {
    (points[c.dataset.series] = points[c.dataset.series] || []).push([+c.dataset.round, +c.dataset.value]);
  }
  const legend = {};
  for (const t of document.querySelectorAll('figure.chart text.legend-label')) {
    legend[t.dataset.series] = t.textContent;
  }
  const clients = [...document.querySelectorAll('#clients-table tbody tr[data-client]')].map(
    (tr) => [tr.dataset.client, ...[...tr.cells].map((td) => td.textContent.trim())]);
  return {status: text('#status'), rounds: text('#rounds-done'), finalAcc: text('#final-acc'), phase: text('#phase'),
          banner: !document.getElementById('banner').hidden, bannerText: text('#banner'), points, legend, clients};
}"""


@pytest.fixture()
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def _page(browser: Any, url: str, errors: list[str]) -> Any:
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    return page


def _state(page: Any) -> dict[str, Any]:
    return page.evaluate(PAGE_STATE)


@pytest.mark.slow
def test_run_page_follows_a_live_federation_and_ends_with_the_report(redis_url: str, browser: Any,
                                                                     tmp_path: Path) -> None:
    dash = Dashboard(redis_url, tmp_path, refresh=0.5)
    # Clients that train for 0.5 s and 1 s a round (FakeTrainer): a run the page can watch live,
    # without two more TensorFlow processes; the aggregator's central evaluation is Keras'.
    fed = CliFederation.driven(redis_url, tmp_path, "browser-run", clients=2, rounds=4, train_seconds=0.5)
    errors: list[str] = []
    states: list[dict[str, Any]] = []
    try:
        wait_until(lambda: get_json(dash.url("/api/runs/browser-run"))[0] == 200, "the run to exist",
                   timeout=60, ignore=(Exception,))
        page = _page(browser, dash.url("/runs/browser-run"), errors)
        ARTIFACTS.mkdir(exist_ok=True)
        shot_live = False
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # the page is never reloaded: it must update itself
            states.append(_state(page))
            if states[-1]["status"] in ("finished", "failed"):
                break
            if not shot_live and states[-1]["points"].get("test_accuracy"):
                page.screenshot(path=str(ARTIFACTS / "dashboard-run-live.png"), full_page=False)
                shot_live = True
            time.sleep(0.2)
        fed.wait_exit()
        page.wait_for_timeout(300)
        page.screenshot(path=str(ARTIFACTS / "dashboard-run.png"), full_page=True)
        end = _state(page)
    finally:
        fed.close()
        dash.stop()
    assert not errors, errors
    assert end["status"] == "finished", end
    live = [s for s in states if s["status"] == "running" and 0 < len(s["points"].get("test_accuracy", [])) < 4]
    assert live, "the chart should grow while the run trains: " + json.dumps([(s["status"], s["rounds"])
                                                                             for s in states])
    assert any(s["clients"] and s["status"] == "running" for s in states), "the clients table should fill while running"

    out = tmp_path / "report"
    done = subprocess.run(fedq_cmd("report", "--run", "browser-run", "--out", str(out)), env=cli_env(redis_url),
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert (out / "curves.png").exists()

    rounds = report["rounds"]
    for key in ("train_accuracy", "test_accuracy", "train_loss", "test_loss"):
        assert end["points"][key] == [[m["round"], m[key]] for m in rounds], key
    final = report["final"]["test_accuracy"]
    assert final == rounds[-1]["test_accuracy"]
    assert end["finalAcc"] == f"{final:.4f}"
    assert end["legend"]["test_accuracy"] == f"test {final:.4f}"
    assert end["rounds"] == "4 / 4"

    header = ["client", "shard", "liveness", "host", "last seen", "last round pushed", "samples", "local loss",
              "local accuracy", "train s", "refused"]
    rows = {row[0]: dict(zip(header, row[1:])) for row in end["clients"]}
    assert sorted(rows) == rounds[-1]["clients"]
    assert {r["last round pushed"] for r in rows.values()} == {str(rounds[-1]["round"])}
    assert sum(int(r["samples"]) for r in rows.values()) == rounds[-1]["num_examples"]
    assert {r["refused"] for r in rows.values()} == {"0"} and not report["refused"]


@pytest.mark.slow
def test_banner_while_redis_is_away_and_recovery_without_reload(browser: Any, tmp_path: Path) -> None:
    server = RedisServer()
    dash = Dashboard(server.url, tmp_path, refresh=0.5)
    errors: list[str] = []
    try:
        make_run(redis.Redis.from_url(server.url), "steady", rounds=3, committed=1)
        page = _page(browser, dash.url("/runs/steady"), errors)
        wait_until(lambda: _state(page)["rounds"] == "1 / 3", "the page to fill", timeout=15, ignore=(Exception,))
        assert not _state(page)["banner"]
        server.kill()
        state = wait_until(lambda: (s := _state(page))["banner"] and s, "the banner", timeout=15, ignore=(Exception,))
        assert "Redis is unreachable" in state["bannerText"]
        assert state["rounds"] == "1 / 3", "what was shown stays on the page"
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-redis-down.png"), full_page=False)
        server.start()  # same port; the test server keeps nothing, so the run is written again
        make_run(redis.Redis.from_url(server.url), "steady", rounds=3, committed=2)
        wait_until(lambda: not (s := _state(page))["banner"] and s["rounds"] == "2 / 3", "recovery",
                   timeout=20, ignore=(Exception,))
        assert dash.proc.poll() is None
    finally:
        dash.stop()
        server.stop()
    assert not errors, errors
