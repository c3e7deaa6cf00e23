"""Rounds to a target test accuracy: FedAvg (several local epochs) vs FedSGD (one full-batch step).

The shape of McMahan et al. (2017), Table 2 / Figure 2: with the same clients, model, optimizer
(plain SGD) and learning rate, letting each client do more local work per round cuts the rounds
needed by one to two orders of magnitude. In-process simulation (fedq.roles.simulation) of the seed
network on the built-in data, IID shards; tests/test_fedsgd.py checks one seed of it.

    python experiments/fedsgd_vs_fedavg.py --seeds 0 1 2 --target 0.95
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from fedq.roles.simulation import Federation, rounds_to
from fedq.learning.spec import RunSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--learning-rate", type=float, default=0.05)
    ap.add_argument("--max-rounds", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=5, help="FedAvg's local epochs (E)")
    ap.add_argument("--batch-size", type=int, default=10, help="FedAvg's local batch size (B)")
    args = ap.parse_args()

    print(f"{args.clients} clients (IID), SGD lr {args.learning_rate}, target test accuracy {args.target}")
    print("| seed | FedSGD rounds | FedAvg (E={}, B={}) rounds | ratio |\n| --- | --- | --- | --- |".format(
        args.epochs, args.batch_size))
    for seed in args.seeds:
        t0 = time.monotonic()
        sgd = RunSpec(clients=args.clients, rounds=args.max_rounds, local_epochs=1, batch_size=10**9,
                      optimizer="sgd", learning_rate=args.learning_rate, seed=seed).validate()
        avg = dataclasses.replace(sgd, local_epochs=args.epochs, batch_size=args.batch_size)
        n_sgd = rounds_to(Federation.build(sgd).run(target=args.target), args.target)
        n_avg = rounds_to(Federation.build(avg).run(target=args.target), args.target)
        ratio = f"{n_sgd / n_avg:.0f}x" if n_sgd and n_avg else "-"
        print(f"| {seed} | {n_sgd or f'>{args.max_rounds}'} | {n_avg or f'>{args.max_rounds}'} | {ratio} |"
              f"  ({time.monotonic() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
