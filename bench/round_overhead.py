"""Round overhead: the part of a federated round that is not training.

Runs the real aggregator (``fedq aggregator``, an rq worker with TensorFlow for central
evaluation) and N real client loops as separate processes against a private Redis, with
local training replaced by a no-op trainer that returns the global weights unchanged. A
round's wall time is then exactly the machinery: wake-up, fetch and decode of the global
model, encode and push of N updates, validation and FedAvg, central evaluation, commit.

    python bench/round_overhead.py [--clients 2 10 50] [--rounds 12]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

from fedq import protocol
from fedq.client import Client
from fedq.jobs import submit_run
from fedq.localredis import LocalRedis, die_with_parent
from fedq.settings import Settings
from fedq.spec import RunSpec
from fedq.store import RunStore, connect


class NoTraining:
    """A trainer that trains nothing: returns the global weights as its update."""

    def __init__(self, names: list[str], num_examples: int) -> None:
        self.names = names
        self.num_examples = num_examples
        self._w: list[np.ndarray] = []

    def load(self, tensors: list[np.ndarray]) -> None:
        self._w = tensors

    def train(self, round_no: int) -> dict[str, float]:
        return {"loss": 0.0, "accuracy": 0.0}

    def weights(self) -> list[np.ndarray]:
        return self._w


def client_main(url: str, run_id: str, shard: int) -> None:
    settings = Settings.from_env(env={}, redis_url=url, block_seconds=0.5)
    r = connect(settings)
    store = RunStore(r, run_id)

    def factory(spec, num_features, num_classes, x, y, shard_, stop) -> NoTraining:
        _, names, _ = protocol.decode_global(store.global_payload(), run_id)
        return NoTraining(names, len(y))

    Client(r, settings, shard, run_id=run_id, trainer_factory=factory).serve(once=True)


def measure(n: int, rounds: int) -> dict[str, float]:
    with LocalRedis() as server:
        settings = Settings.from_env(env={}, redis_url=server.url)
        r = connect(settings)
        spec = RunSpec(clients=n, rounds=rounds, local_epochs=1, run_id=f"bench-{n}").validate()
        queue = f"bench-{n}"
        submit_run(r, settings, spec, queue=queue)
        env = dict(os.environ, FEDQ_REDIS_URL=server.url, FEDQ_LOG_LEVEL="WARNING", FEDQ_BLOCK_SECONDS="0.5")
        procs = [subprocess.Popen([sys.executable, "-m", "fedq", "aggregator", "--queue", queue, "--burst"],
                                  env=env, preexec_fn=die_with_parent)]
        procs += [subprocess.Popen([sys.executable, __file__, "--client", server.url, spec.run_id, str(k)],
                                   env=env, preexec_fn=die_with_parent) for k in range(n)]
        for p in procs:
            if p.wait(timeout=600) != 0:
                raise SystemExit(f"a benchmark process failed with code {p.returncode}")
        metrics = RunStore(r, spec.run_id).metrics()[2:]  # rounds 1-2 include TF warm-up (tracing)
        secs = [m["seconds"] * 1000 for m in metrics]
        fetch = [max(c["fetch_seconds"] for c in m["clients"].values()) * 1000 for m in metrics]
        return {"clients": n, "rounds": len(secs), "median_ms": statistics.median(secs),
                "p90_ms": float(np.percentile(secs, 90)), "fold_ms": statistics.median(m["fold_seconds"] * 1000 for m in metrics),
                "eval_ms": statistics.median(m["eval_seconds"] * 1000 for m in metrics),
                "max_client_fetch_ms": statistics.median(fetch)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[2, 10])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--client", nargs=3, metavar=("URL", "RUN", "SHARD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        client_main(args.client[0], args.client[1], int(args.client[2]))
        return
    rows = [measure(n, args.rounds) for n in args.clients]
    print(f"{'clients':>7} {'rounds':>6} {'median ms':>9} {'p90 ms':>7} {'fold ms':>7} {'eval ms':>7} {'fetch ms':>8}")
    for row in rows:
        print(f"{row['clients']:>7} {row['rounds']:>6} {row['median_ms']:>9.1f} {row['p90_ms']:>7.1f} "
              f"{row['fold_ms']:>7.2f} {row['eval_ms']:>7.1f} {row['max_client_fetch_ms']:>8.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
