"""Final test accuracy of strategies on label-skewed (Dirichlet) clients, over several seeds.

By default every run is a real federation: ``fedq run`` (its own Redis, an aggregator and N
client processes), the same command a user types; ``--simulate`` runs the same math in one
process (fedq.roles.simulation), which is faster. The seed sets the data split, the partition, the
initial weights and the shuffling. Not part of the test suite (it takes minutes).

    python experiments/dirichlet_strategies.py                      # 5 seeds x fedavg, fedprox, fedadam
    python experiments/dirichlet_strategies.py --seeds 0 1 --strategies fedavg fedyogi --simulate
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def run_cli(strategy: str, seed: int, args: argparse.Namespace, out: Path) -> float:
    cmd = [sys.executable, "-m", "fedq", "run", "--clients", str(args.clients), "--rounds", str(args.rounds),
           "--partition", "dirichlet", "--alpha", str(args.alpha), "--strategy", strategy, "--seed", str(seed),
           "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "FEDQ_REDIS_URL"} | {"FEDQ_LOG_LEVEL": "WARNING"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return json.loads((out / "report.json").read_text())["final"]["test_accuracy"]


def run_sim(strategies: list[str], seed: int, args: argparse.Namespace) -> dict[str, float]:
    from fedq.learning.dataspec import DataSpec
    from fedq.roles.simulation import Federation
    from fedq.learning.spec import RunSpec
    from fedq.learning.strategies import StrategySpec

    out = {}
    for strategy in strategies:
        spec = RunSpec(clients=args.clients, rounds=args.rounds, seed=seed, strategy=StrategySpec(name=strategy),
                       data=DataSpec(partition="dirichlet", alpha=args.alpha, seed=seed)).validate()
        # FedProx changes client training, so each strategy gets trainers built for its spec.
        out[strategy] = Federation.build(spec).run()[-1]["test_accuracy"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategies", nargs="+", default=["fedavg", "fedprox", "fedadam"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--simulate", action="store_true", help="in-process simulation instead of fedq run")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    results: dict[str, dict[int, float]] = {s: {} for s in args.strategies}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedq-exp-") as tmp:
        for seed in args.seeds:
            if args.simulate:
                for strategy, acc in run_sim(args.strategies, seed, args).items():
                    results[strategy][seed] = acc
            else:
                for strategy in args.strategies:
                    results[strategy][seed] = run_cli(strategy, seed, args, Path(tmp) / f"{strategy}-{seed}")
            print(f"seed {seed}: " + ", ".join(f"{s} {results[s][seed]:.4f}" for s in args.strategies), flush=True)

    mode = "in-process simulation" if args.simulate else "fedq run (real processes)"
    print(f"\n{args.clients} clients, Dirichlet alpha {args.alpha}, {args.rounds} rounds, seeds {args.seeds}, "
          f"{mode}, {time.monotonic() - t0:.0f} s")
    print("| strategy | mean | std | min | max | per seed |\n| --- | --- | --- | --- | --- | --- |")
    for strategy, by_seed in results.items():
        v = np.array([by_seed[s] for s in args.seeds])
        print(f"| {strategy} | {v.mean():.4f} | {v.std(ddof=1) if len(v) > 1 else 0:.4f} | {v.min():.4f} | "
              f"{v.max():.4f} | {' '.join(f'{x:.3f}' for x in v)} |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
