"""Final test accuracy when one of the clients is malicious, per strategy and attack.

One of 5 clients (the last) replaces its update: ``scale`` sends its honest update times -10,
``noise`` sends the global model plus Gaussian noise (std 3). In-process simulation
(fedq.roles.simulation) of the seed network on the built-in data, IID shards; tests/test_poisoning.py
checks seed 0 of it.

    python experiments/poisoning.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from fedq.roles.simulation import Federation, gaussian_noise, scaled_update
from fedq.learning.spec import RunSpec
from fedq.learning.strategies import StrategySpec

ATTACKS = {"none": None, "scale": scaled_update(-10.0), "noise": gaussian_noise(3.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--strategies", nargs="+", default=["fedavg", "fedmedian", "trimmed-mean", "krum", "multi-krum"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--clip-norm", type=float, help="also clip every update to this norm")
    args = ap.parse_args()

    acc: dict[tuple[str, str], list[float]] = {}
    for seed in args.seeds:
        spec = RunSpec(clients=5, rounds=args.rounds, local_epochs=args.local_epochs, seed=seed).validate()
        fed = Federation.build(spec)
        for name in args.strategies:
            strategy = StrategySpec(name=name, clip_norm=args.clip_norm)
            for attack, fn in ATTACKS.items():
                rec = fed.run(dataclasses.replace(spec, strategy=strategy), attackers={4: fn} if fn else None)
                acc.setdefault((name, attack), []).append(rec[-1]["test_accuracy"])
        print(f"seed {seed} done", flush=True)
    print(f"\n1 of 5 clients malicious, {args.rounds} rounds x {args.local_epochs} local epochs, seeds {args.seeds}"
          + (f", clip norm {args.clip_norm}" if args.clip_norm else ""))
    print("| strategy | " + " | ".join(ATTACKS) + " |\n| --- |" + " --- |" * len(ATTACKS))
    for name in args.strategies:
        print(f"| {name} | " + " | ".join(f"{np.mean(acc[(name, a)]):.3f}" for a in ATTACKS) + " |")


if __name__ == "__main__":
    main()
