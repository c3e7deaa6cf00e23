"""The dashboard's side of the tests: HTTP GETs, a real `fedq dashboard` process, and runs
written through the store's own API without training."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from support.procs import Proc, cli_env
from support.redis import free_port
from support.wait import wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


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


class Dashboard(Proc):
    """`fedq dashboard` on a free port, ready when it answers /api/health."""

    def __init__(self, redis_url: str, logs: Path, refresh: float = 0.5) -> None:
        self.port = free_port()
        super().__init__("dashboard", ["dashboard", "--host", "127.0.0.1", "--port", str(self.port),
                                       "--refresh", str(refresh)], cli_env(redis_url), logs)
        wait_until(self._ready, "the dashboard to answer", timeout=30, ignore=(Exception,))

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the dashboard exited with {self.proc.returncode}:\n{self.text()}")
        return get_json(self.url("/api/health"))[0] == 200

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def make_run(r: Any, run_id: str, *, clients: int = 2, rounds: int = 3, committed: int = 0,
             pushed: tuple[str, ...] = (), refused: tuple[tuple[str, int, str], ...] = (),
             central_eval: bool = True, model_file: bytes | None = None) -> dict[str, Any]:
    """A run written through the store's own API (create, join, open, commit), without training.

    committed rounds get made-up metrics; pushed clients have an update stored for the open
    round; refused is (client, round, reason) records; model_file goes with the last round's
    commit, as the aggregator stores it. Returns the metrics committed."""
    from fedq.learning.spec import RunSpec
    from fedq.protocol.fencing import Commit
    from fedq.protocol.store import RunStore
    from fedq.protocol.vocabulary import Phase

    store = RunStore(r, run_id)
    store.create(RunSpec(clients=clients, rounds=rounds, run_id=run_id, central_eval=central_eval))
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
                                         after=Phase.DONE if final is not None else Phase.TRAIN,
                                         model_file=model_file if final is not None else None))
        done.append(m)
    for cid in pushed:
        assert store.push_update(cid, committed + 1, b"an update", 1 << 20) == "ok"
    for cid, rnd, reason in refused:
        store.record_refused(cid, rnd, reason, f"{reason} in round {rnd}")
    return {"metrics": done}
