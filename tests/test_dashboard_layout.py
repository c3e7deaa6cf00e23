"""Every dashboard page at desktop and phone width in headless Chromium: no horizontal page
overflow (wide tables scroll inside their cards), the run page's essentials present, no script
errors; screenshots go to test-artifacts/."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from support.dashboard import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, Dashboard, make_run
from support.redis import RedisServer
from support.wait import wait_until

from fedq.protocol.fencing import Commit
from fedq.protocol.store import RunStore

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason=f"needs Debian's chromium at {CHROMIUM} (.ci/run installs it)")

WIDTHS = {"desktop": (1300, 900), "phone": (390, 844)}
OVERFLOW = """() => ({page: document.documentElement.scrollWidth, view: window.innerWidth,
  wide: [...document.querySelectorAll('main *')].filter((n) => n.closest('.scroll') === null
        && n.getBoundingClientRect().right > window.innerWidth + 1)
        .map((n) => n.tagName + '#' + n.id + '.' + n.className).slice(0, 5)})"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Dashboard, redis.Redis]]:
    server = RedisServer()
    r = redis.Redis.from_url(server.url)
    make_run(r, "a-finished-run-with-a-rather-long-identifier", clients=3, rounds=4, committed=4,
             refused=(("client-1", 2, "non_finite"),))
    make_run(r, "a-running-run", clients=3, rounds=6, committed=3, pushed=("client-0",))
    store = RunStore(r, "a-running-run")
    store.driver = "test-driver"
    # a round closed without client-2, whose heartbeat expired
    store.commit_round(Commit(round=4, global_payload=b"g4", metrics={
        "round": 4, "num_updates": 2, "num_examples": 201, "test_accuracy": 0.7, "test_loss": 0.5, "train_loss": 0.2,
        "seconds": 3.0, "overhead_seconds": 2.0, "missing": {"client-2": "heartbeat expired"},
        "clients": {"client-0": {"num_examples": 100, "loss": 0.2, "accuracy": 0.9, "push_time": time.time()}}}))
    dash = Dashboard(server.url, tmp_path_factory.mktemp("layout"), refresh=0.5)
    yield dash, r
    dash.stop()
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


PAGES = {"runs": "/", "run": "/runs/a-running-run", "finished": "/runs/a-finished-run-with-a-rather-long-identifier",
         "compare": "/compare?runs=a-running-run,a-finished-run-with-a-rather-long-identifier"}


@pytest.mark.parametrize("width", sorted(WIDTHS))
@pytest.mark.parametrize("name", sorted(PAGES))
def test_no_horizontal_overflow(site: tuple[Dashboard, redis.Redis], browser: Any, name: str, width: str) -> None:
    dash, _ = site
    w, h = WIDTHS[width]
    page = browser.new_page(viewport={"width": w, "height": h})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(dash.url(PAGES[name]))
        # filled in: the first table has rows from the API
        wait_until(lambda: page.evaluate(
            "() => !document.querySelector('table tbody tr td') ? false : "
            "!/loading/.test(document.querySelector('table tbody').textContent)"), "the page to fill", timeout=15,
            every=0.2, ignore=(Exception,))
        page.wait_for_timeout(300)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}-{width}.png"), full_page=True)
        got = page.evaluate(OVERFLOW)
        if name == "run":
            facts = page.evaluate("""() => ({acc: document.getElementById('final-acc').textContent,
              best: document.getElementById('best-acc').textContent, eta: document.getElementById('eta').textContent,
              marks: [...document.querySelectorAll('#chart-accuracy line.mark')].map((l) => l.dataset.kind),
              bestRing: document.querySelectorAll('#chart-accuracy circle.best').length,
              clientSeries: document.querySelectorAll('#chart-client-loss g.series').length,
              aucShown: document.querySelector('#test-metrics [data-metric=auc]').offsetParent !== null,
              clients: document.getElementById('clients-joined').textContent,
              resumedShown: document.getElementById('resumed-fact').offsetParent !== null})""")
            assert facts["clients"] == "0 / 3 alive (3 joined)", facts  # joined, but no heartbeat here
            assert facts["acc"] == "0.7000" and facts["best"].startswith("best ") and facts["eta"] != "–", facts
            assert "quorum" in facts["marks"] and "lost" in facts["marks"], facts
            assert facts["bestRing"] == 1 and facts["clientSeries"] == 3, facts
            assert not facts["aucShown"] and not facts["resumedShown"], "no AUC measured, never resumed: not shown"
            page.click("#axis-time")
            page.wait_for_timeout(200)
            assert page.evaluate("() => document.querySelector('#chart-accuracy svg').textContent"
                                 ".includes('minutes since start')")
            # the spec: what differs from a default run in view, the full spec one click away
            spec = page.evaluate("""() => ({changes: [...document.querySelectorAll('#spec-changes tbody tr')].map(
                (tr) => tr.cells[0].textContent.trim()), fullShown: document.getElementById('spec-full').open})""")
            assert "rounds" in spec["changes"] and "batch_size" not in spec["changes"] and not spec["fullShown"]
            page.click("#spec-full summary")
            full = page.evaluate("() => [document.getElementById('spec-full').open, [...document.querySelectorAll("
                                 "'#spec-table tr')].map((tr) => tr.cells[0].textContent.trim())]")
            assert full[0] and {"run_id", "batch_size", "rounds"} <= set(full[1]), full
    finally:
        page.close()
    assert not errors, errors
    assert got["page"] <= got["view"], f"{name} at {w} px is {got['page']} px wide: {got['wide']}"


def test_picking_two_runs_on_the_runs_page_compares_them(site: tuple[Dashboard, redis.Redis], browser: Any) -> None:
    dash, r = site
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(dash.url("/"))
        page.wait_for_selector("#runs-table input.pick", timeout=15_000)
        assert page.is_disabled("#compare-btn")
        for run_id in ("a-running-run", "a-finished-run-with-a-rather-long-identifier"):
            page.check(f"#runs-table input.pick[value='{run_id}']")
        page.click("#compare-btn")
        page.wait_for_url("**/compare?runs=*", timeout=15_000)
        got = wait_until(lambda: page.evaluate("""() => {
            const pts = {};
            for (const c of document.querySelectorAll('#compare-accuracy circle')) {
              (pts[c.dataset.series] = pts[c.dataset.series] || []).push(+c.dataset.round);
            }
            const spec = [...document.querySelectorAll('#compare-spec tbody tr')].map(
              (tr) => [...tr.cells].map((td) => td.textContent.trim()));
            return Object.keys(pts).length === 2 && spec.length ? {pts, spec} : null;
          }"""), "the compare page to draw both runs", timeout=15, every=0.2)
    finally:
        page.close()
    assert not errors, errors
    for run_id in ("a-running-run", "a-finished-run-with-a-rather-long-identifier"):
        want = [m["round"] for m in RunStore(r, run_id).metrics() if m.get("test_accuracy") is not None]
        assert sorted(got["pts"][f"{run_id} test_accuracy"]) == want, got["pts"]
    assert ["rounds", "6", "4"] in got["spec"], got["spec"]
