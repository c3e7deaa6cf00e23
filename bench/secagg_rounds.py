"""Secure aggregation's round overhead: the same federation with and without it, interleaved.

Real aggregator and client processes, one per client (bench/round_overhead.py's measure_fedq:
no-op training, so a round is only the machinery), no central evaluation. Per configuration:
the median round time of rounds 2+, the bytes through Redis per round (everything any process
sent or read, over all rounds), and a client process's user + system CPU per round (rounds 2+,
the mean over the clients); then the medians over the repeats, in a table with the date, the
commit and the load average before each run.

    python bench/secagg_rounds.py --model 1m --clients 10 --rounds 5 --repeat 3
    python bench/secagg_rounds.py --model 1m --clients 50 --rounds 3 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.round_overhead import measure_fedq  # noqa: E402
from fedq.settings import Settings  # noqa: E402

MODES = ("plain", "secure")
FIELDS = (("median_s", "round (s)", "{:.2f}"), ("redis_mib_per_round", "Redis MiB / round", "{:.1f}"),
          ("client_cpu_s", "client CPU (s) / round", "{:.2f}"))


def _commit() -> str:
    got = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return got.stdout.strip() or "unknown"


def table(medians: dict[str, dict[str, float]]) -> list[str]:
    """Markdown rows: plain and secure side by side, and their ratio."""
    lines = ["| per round | plain | `--secure-aggregation` | ratio |", "|---|---:|---:|---:|"]
    for key, label, fmt in FIELDS:
        plain, secure = medians["plain"][key], medians["secure"][key]
        ratio = f"{secure / plain:.2f}x" if plain else "-"
        lines.append(f"| {label} | {fmt.format(plain)} | {fmt.format(secure)} | {ratio} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1m")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write every run's figures here")
    args = ap.parse_args()
    if args.rounds < 2:
        ap.error("--rounds must be at least 2: round 1 (start-up) is not measured")
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    loads: list[str] = []
    for i in range(args.repeat):
        for mode in MODES if i % 2 == 0 else MODES[::-1]:  # interleaved, alternating which goes first
            loads.append(f"{mode} {os.getloadavg()[0]:.1f}")
            row = measure_fedq(args.clients, args.model, args.rounds, Settings().chunk_bytes,
                               threads_over=args.clients, central_eval=False, secure_aggregation=mode == "secure")
            print(f"repeat {i + 1} {mode}: {json.dumps(row)}", file=sys.stderr, flush=True)
            runs[mode].append(row)
    medians = {m: {k: statistics.median(r[k] for r in rows) for k, _, _ in FIELDS} for m, rows in runs.items()}
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {_commit()}, model {args.model}, "
          f"N = {args.clients}, {args.rounds} rounds (2+ timed), median of {args.repeat}")
    print("\n".join(table(medians)))
    print("load average (1 min) before each run: " + ", ".join(loads))
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "loads": loads, "medians": medians}, indent=1))


if __name__ == "__main__":
    main()
