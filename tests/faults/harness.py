"""A federation of real processes on a Redis of its own, with the means to break it.

``Federation`` starts aggregators and clients the way users do (``fedq ...``), each in its
own process group so a test can SIGKILL a worker together with its work horse. ``audit()``
checks the run's records against the push log: every round's accepted updates are exactly
the last ones each client pushed for it, none lost, none counted twice, and the final model
is the FedAvg of the final round's accepted updates. Each run's initial model is stored with it
(``support.initial``), as a submitter does. A run has no central evaluation unless the test asks
for it (``central_eval``: a scenario that checks test metrics): then no process of the federation
loads TensorFlow (the run is submitted through ``support.fake_client``, whose ``fedq submit``
stores that model); with it, only the aggregators do.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis
from blake3 import blake3
from support.fake_client import fake_client_cmd, fake_client_env
from support.federation import CliFederation
from support.initial import store_initial
from support.procs import Proc, cli_env, fedq_cmd
from support.redis import RedisServer
from support.table import add_row
from support.wait import wait_until

from fedq.learning.aggregate import fedavg
from fedq.protocol import codec, messages
from fedq.protocol.store import RunStore

TABLE = "fault suite"  # one row per scenario (support.table), printed at the end of the session
COLUMNS = [("scenario", "scenario", -42, ""), ("outcome", "outcome", -9, ""), ("rounds", "rounds", 6, ""),
           ("accepted", "accepted", 8, ""), ("refused", "refused", 7, ""), ("lost", "lost", 4, ""),
           ("double", "double", 6, ""), ("seconds", "seconds", 7, ".1f")]


@dataclass
class Audit:
    rounds: int
    accepted: int
    refused: int
    lost: int
    double_counted: int


class Federation(CliFederation):
    """One run on its own redis-server, with its aggregator and client processes."""

    def __init__(self, tmp_path: Path, *, clients: int = 2, rounds: int = 3, min_clients: int | None = None,
                 round_timeout: float = 60, redis_args: tuple[str, ...] = (), run_id: str = "fault",
                 lease: float = 3.0, real_training: bool = False, central_eval: bool = False,
                 submit: tuple[str, ...] = ()) -> None:
        """submit: more `fedq submit` options (e.g. --aggregation buffered ...)."""
        self.t0 = time.monotonic()
        self.server = RedisServer(*redis_args)
        self.url = self.server.url
        super().__init__(cli_env(self.url, FEDQ_LEASE_SECONDS=str(lease), FEDQ_BLOCK_SECONDS="0.5",
                                 FEDQ_TF_THREADS="1", FEDQ_WAIT_SECONDS="120"), tmp_path,
                         fake_training=not real_training)
        self.r = redis.Redis.from_url(self.url, socket_timeout=10)
        self.run_id = run_id
        self.clients = clients
        args = ["submit", "--clients", str(clients), "--rounds", str(rounds), "--local-epochs", "1",
                "--round-timeout", str(round_timeout), "--keep-updates", "--run-id", run_id]
        if min_clients is not None:
            args += ["--min-clients", str(min_clients)]
        args += list(submit)
        try:
            if central_eval:
                done = subprocess.run(fedq_cmd(*args), env=self.env, capture_output=True, text=True, timeout=60)
            else:  # the submitter stores support.initial's model with the run (support.fake_client)
                done = subprocess.run(fake_client_cmd(*args, "--no-central-eval"), env=fake_client_env(self.env),
                                      capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            # The initial model comes with the run (support.initial), before any aggregator
            # starts: no aggregator here builds it in a child of its own.
            if central_eval:
                store_initial(self.r, run_id)
            assert self.store.initial_payload() is not None
        except BaseException:
            self.server.stop()  # the fixture never saw this federation: its Redis must not outlive it
            raise

    @property
    def store(self) -> RunStore:
        return RunStore(self.r, self.run_id)

    # --- processes ---------------------------------------------------------------------
    def aggregator(self, name: str = "agg-a") -> Proc:
        return self.start(name, "aggregator")

    def client(self, k: int, name: str | None = None, env: dict[str, str] | None = None) -> Proc:  # type: ignore[override]
        return super().client(k, self.run_id, name, env)

    def signal(self, name: str, sig: int) -> None:
        """Send sig to a process; SIGKILL takes its whole tree and sessions too (an rq worker's
        work horse runs in a process group of its own), as the loss of a node or pod would."""
        self.procs[name].signal(sig)

    def exit_code(self, name: str, timeout: float = 60) -> int:
        return self.procs[name].proc.wait(timeout=timeout)

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.signal(signal.SIGKILL)
            p.proc.wait(timeout=10)
        self.server.stop()

    # --- waiting --------------------------------------------------------------------------
    def wait(self, cond: Callable[[], bool], what: str, timeout: float = 120) -> None:
        # ConnectionError: the test may be restarting Redis.
        wait_until(cond, what, timeout, every=0.1, ignore=(redis.ConnectionError,), detail=self.logs_tail)

    def wait_round(self, round_no: int, timeout: float = 120) -> None:
        self.wait(lambda: self.store.committed_round() >= round_no, f"round {round_no} to commit", timeout)

    def wait_pushed(self, round_no: int, count: int = 1, timeout: float = 120) -> None:
        self.wait(lambda: len(self.store.update_seqs(round_no)) >= count, f"{count} pushes in round {round_no}",
                  timeout)

    def wait_end(self, timeout: float = 180) -> dict[str, str]:
        self.wait(lambda: self.store.state().get("status") in ("finished", "failed"), "the run to end", timeout)
        return self.store.state()

    # --- checking ---------------------------------------------------------------------------
    def audit(self) -> Audit:
        """Check exactly-once accounting; returns the counts (lost and double-counted must be 0)."""
        store = self.store
        metrics = store.metrics()
        # What the clients say they pushed (their own logs: these clients are honest) ...
        last_ok: dict[tuple[int, str], str] = {}
        for p in store.pushes():
            if p["outcome"] == "ok":
                last_ok[(int(p["round"]), p["client"])] = p["digest"]
        # ... and what the aggregator judged (its audit trail, out of the clients' reach).
        last_accepted: dict[tuple[int, str], str] = {}
        for j in store.judged():
            if j["outcome"] == "accepted":
                last_accepted[(int(j["round"]), j["client"])] = j["digest"]
        refused_at_aggregation = {(x["round"], x["client"]) for x in store.refused() if x["stage"] == "aggregate"}
        lost = double = accepted = 0
        for m in metrics:
            rnd = m["round"]
            got = m["clients"]
            accepted += len(got)
            if sum(c["num_examples"] for c in got.values()) != m["num_examples"] or len(got) != m["num_updates"]:
                double += 1
            for cid, info in got.items():
                if last_ok.get((rnd, cid)) != info["digest"]:
                    double += 1  # counted something other than the client's last accepted push
                if last_accepted.get((rnd, cid)) != info["digest"]:
                    double += 1  # counted something the aggregator's audit trail does not show accepted
            for (r_, cid) in last_ok:
                if r_ == rnd and cid not in got and (rnd, cid) not in refused_at_aggregation:
                    lost += 1
        assert [m["round"] for m in metrics] == list(range(1, len(metrics) + 1)), "a round committed twice"
        if metrics and store.state().get("status") == "finished":
            self._check_final_model(metrics[-1])
        return Audit(len(metrics), accepted, len(store.refused()), lost, double)

    def _check_final_model(self, last: dict) -> None:
        rnd = last["round"]
        models = []
        for cid, info in last["clients"].items():
            payload = self.r.get(self.store.k.update_taken(cid, rnd))  # the version the aggregator took
            assert blake3(payload).hexdigest() == info["digest"]  # the audit's digest: BLAKE3
            env = codec.decode(payload)
            models.append((list(env.tensors), env.meta["num_examples"]))
        expected = fedavg(models)
        _, _, final = messages.decode_global(self.store.global_payload(), self.run_id)
        for got, want in zip(final, expected):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

    def record(self, scenario: str, audit: Audit | None) -> None:
        state = self.store.state() if self.server.proc.poll() is None else {}
        a = audit or Audit(0, 0, 0, 0, 0)
        add_row(TABLE, COLUMNS, {"scenario": scenario, "outcome": state.get("status", "?"), "rounds": a.rounds,
                                 "accepted": a.accepted, "refused": a.refused, "lost": a.lost,
                                 "double": a.double_counted, "seconds": time.monotonic() - self.t0})
