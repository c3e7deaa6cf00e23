"""Support for the dashboard, status and metrics tests: real federations and a real dashboard
process (no tests here; the name only keeps the file beside the suites that import it)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers import cli_env, fedq_cmd, free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def http_get(url: str, timeout: float = 10) -> tuple[int, bytes, dict[str, str]]:
    """(status, body, headers) of a GET; HTTP errors are answers too."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def get_json(url: str) -> tuple[int, Any]:
    status, body, _ = http_get(url)
    return status, json.loads(body)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60, every: float = 0.2) -> Any:
    """Poll check until it returns something truthy; AssertionError naming what after timeout."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except AssertionError:
            raise
        except Exception as exc:  # e.g. the server is not listening yet
            last_exc = exc
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}" + (f" (last error: {last_exc})" if last_exc else ""))


class Proc:
    """A fedq CLI process with its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.log = logs / f"{name}.log"
        self.proc = subprocess.Popen(fedq_cmd(*args), env=env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"{self.name} did not finish in {timeout:g} s; log:\n{self.text()[-3000:]}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


class Dashboard(Proc):
    """`fedq dashboard` on a free port, ready when it answers /api/health."""

    def __init__(self, redis_url: str, logs: Path, refresh: float = 0.5) -> None:
        self.port = free_port()
        super().__init__("dashboard", ["dashboard", "--host", "127.0.0.1", "--port", str(self.port),
                                       "--refresh", str(refresh)], cli_env(redis_url), logs)
        wait_for("the dashboard to answer", self._ready, timeout=30)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the dashboard exited with {self.proc.returncode}:\n{self.text()}")
        return get_json(self.url("/api/health"))[0] == 200

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


class Federation:
    """An aggregator that creates and drives one run, and its clients, all as CLI processes."""

    def __init__(self, redis_url: str, logs: Path, run_id: str, clients: int = 2, rounds: int = 3,
                 local_epochs: int = 1, extra: tuple[str, ...] = ()) -> None:
        env = cli_env(redis_url)
        env["FEDQ_TF_THREADS"] = "1"  # the tests share 2 cores with everything else
        self.run_id = run_id
        self.procs = [Proc(f"client-{k}", ["client", "--shard", str(k), "--run", run_id, "--once"], env, logs)
                      for k in range(clients)]
        self.procs.append(Proc("aggregator", ["aggregator", "--clients", str(clients), "--rounds", str(rounds),
                                              "--local-epochs", str(local_epochs), "--run-id", run_id, *extra],
                               env, logs))

    def wait(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            code = p.wait(max(1.0, deadline - time.monotonic()))
            assert code == 0, f"{p.name} exited {code}; log:\n{p.text()[-3000:]}"

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


def make_run(r: Any, run_id: str, *, clients: int = 2, rounds: int = 3, committed: int = 0,
             pushed: tuple[str, ...] = (), refused: tuple[tuple[str, int, str], ...] = ()) -> dict[str, Any]:
    """A run written through the store's own API (create, join, open, commit), without training.

    committed rounds get made-up metrics; pushed clients have an update stored for the open
    round; refused is (client, round, reason) records. Returns the metrics committed."""
    from fedq.learning.spec import RunSpec
    from fedq.protocol.store import Commit, RunStore
    from fedq.protocol.vocabulary import Phase

    store = RunStore(r, run_id)
    store.create(RunSpec(clients=clients, rounds=rounds, run_id=run_id))
    for k in range(clients):
        rec = {"shard": k, "num_shards": clients, "rows": 100 + k, "host": f"site-{k}", "pid": 1000 + k,
               "joined_at": time.time()}
        assert store.join(f"client-{k}", rec, {"count": [1]}) == "requested"
        assert store.admit(f"client-{k}")
    assert store.acquire_lease("test-driver", 60)
    store.mark_started("test-driver")
    assert store.open_training(b"scaler", b"initial")
    done = []
    for rnd in range(1, committed + 1):
        m = {"round": rnd, "num_updates": clients, "num_examples": sum(100 + k for k in range(clients)),
             "train_loss": 1.0 / (rnd + 1), "train_accuracy": 0.5 + rnd / (2 * rounds + 2),
             "test_loss": 1.1 / (rnd + 1), "test_accuracy": 0.45 + rnd / (2 * rounds + 2), "seconds": 0.5 + rnd,
             "overhead_seconds": 0.01, "refused": 0,
             "clients": {f"client-{k}": {"num_examples": 100 + k, "loss": 0.3 / rnd + k / 100,
                                         "accuracy": 0.8 + rnd / 100 - k / 100, "train_seconds": 0.25,
                                         "push_time": time.time()} for k in range(clients)}}
        final = ({"test_loss": m["test_loss"], "test_accuracy": m["test_accuracy"], "round": rnd}
                 if rnd == rounds else None)
        assert store.commit_round(Commit(round=rnd, global_payload=f"global-{rnd}".encode(), metrics=m, final=final,
                                         after=Phase.DONE if final is not None else Phase.TRAIN))
        done.append(m)
    for cid in pushed:
        assert store.push_update(cid, committed + 1, b"an update", 1 << 20) == "ok"
    for cid, rnd, reason in refused:
        store.record_refused(cid, rnd, reason, f"{reason} in round {rnd}")
    return {"metrics": done}
