"""Secure aggregation's round overhead: the same federation with and without it, interleaved.

Real aggregator and client processes (bench/round_overhead.py's measure_fedq: no-op training, so a
round is only the machinery), no central evaluation; per configuration the median round time of
rounds 2+ and the bytes through Redis per round, then the medians over the repeats.

    python bench/secagg_rounds.py --model 1m --clients 10 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.round_overhead import measure_fedq
from fedq.settings import Settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1m")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"plain": [], "secure": []}
    loads = []
    for _ in range(args.repeat):
        for mode in runs:  # interleaved, so a change in the machine's load hits both alike
            loads.append(os.getloadavg()[0])
            runs[mode].append(measure_fedq(args.clients, args.model, args.rounds, Settings().chunk_bytes,
                                           threads_over=args.clients, central_eval=False,
                                           secure_aggregation=mode == "secure"))
    out = {mode: {k: statistics.median(r[k] for r in rows) for k in ("median_s", "redis_mib_per_round")}
           for mode, rows in runs.items()}
    print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": args.model,
                      "clients": args.clients, "rounds": args.rounds, "repeat": args.repeat,
                      "load_1min": [round(x, 1) for x in loads], "medians": out, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
