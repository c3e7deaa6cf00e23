"""Wall time until the global model first reaches a test accuracy, `fedq run --aggregation sync`
against `--aggregation buffered`, with stragglers.

Every run is a real federation (`fedq run`: its own Redis, an aggregator and 5 client
processes) on the built-in data. The last 2 clients are stragglers: `--straggler-delay` is set
to 4x the fast clients' training time, measured first by a two-round calibration run without stragglers, so that
they train 5x slower (the ratio each run saw, from the client logs, is printed). Sync rounds
wait for every client; buffered versions commit after --buffer-size updates (the 3 fast
clients' worth), folding the stragglers' updates stale. Runs alternate (seed 0 sync first,
seed 1 buffered first, ...) so that a change in the machine's load hits both alike.

Time to the target is the commit time of the first round / version whose central test
accuracy reaches it, counted from training open (the sum of the records' `seconds`), so that
starting processes and loading TensorFlow, equal for both, are left out. Not part of the test
suite (several minutes per run on 2 loaded cores).

    python experiments/buffered_vs_sync.py                 # seeds 0-2, target 0.95
    python experiments/buffered_vs_sync.py --seeds 0 --rounds 6
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CLIENTS, STRAGGLERS = 5, 2
TRAINED = re.compile(r"round \d+: .* trained ([0-9.]+) s")


def fedq_run(args: list[str], out: Path) -> dict:
    """`fedq run ARGS --out OUT` with a private Redis; its report.json."""
    env = {k: v for k, v in os.environ.items() if k != "FEDQ_REDIS_URL"} | {"FEDQ_LOG_LEVEL": "INFO"}
    done = subprocess.run([sys.executable, "-m", "fedq", "run", *args, "--out", str(out)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"fedq run {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return json.loads((out / "report.json").read_text())


def train_seconds(out: Path, clients: range) -> list[float]:
    """Each local training's seconds (straggler delay included) from these clients' logs."""
    return [float(m.group(1)) for k in clients
            for m in TRAINED.finditer((out / "logs" / f"client-{k}.log").read_text(errors="replace"))]


def time_to(report: dict, target: float) -> float | None:
    """Seconds from training open to the first commit reaching the target accuracy (None: never)."""
    elapsed = 0.0
    for m in report["rounds"]:
        elapsed += m["seconds"]
        if (m.get("test_accuracy") or 0.0) >= target:
            return elapsed
    return None


def one(mode: str, seed: int, delay: float, args: argparse.Namespace, out: Path) -> dict:
    common = ["--clients", str(CLIENTS), "--seed", str(seed), "--local-epochs", str(args.local_epochs),
              "--straggler-clients", str(STRAGGLERS), "--straggler-delay", f"{delay:.2f}"]
    if mode == "sync":
        extra = ["--rounds", str(args.rounds)]
    else:
        extra = ["--aggregation", "buffered", "--rounds", str(args.versions), "--buffer-size", str(args.buffer_size),
                 "--max-staleness", str(args.max_staleness)]
    load = os.getloadavg()[0]
    report = fedq_run([*common, *extra], out)
    fast = train_seconds(out, range(CLIENTS - STRAGGLERS))
    slow = train_seconds(out, range(CLIENTS - STRAGGLERS, CLIENTS))
    return {"mode": mode, "seed": seed, "to_target": time_to(report, args.target),
            "final": report["final"]["test_accuracy"], "commits": len(report["rounds"]),
            "total": sum(m["seconds"] for m in report["rounds"]),
            "slowdown": statistics.median(slow) / statistics.median(fast) if fast and slow else None,
            "load": (load + os.getloadavg()[0]) / 2}


def calibrate(args: argparse.Namespace, out: Path) -> float:
    """4x the clients' median training time, from two sync rounds without stragglers."""
    fedq_run(["--clients", str(CLIENTS), "--rounds", "2", "--local-epochs", str(args.local_epochs)], out)
    times = train_seconds(out, range(CLIENTS))
    return 4 * statistics.median(times)


def _fmt(v: float | None, f: str = ".1f") -> str:
    return "never" if v is None else format(v, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--rounds", type=int, default=8, help="sync rounds")
    ap.add_argument("--versions", type=int, help="buffered versions (default: as many client updates as sync)")
    ap.add_argument("--buffer-size", type=int, default=CLIENTS - STRAGGLERS)
    ap.add_argument("--max-staleness", type=int, default=10)
    ap.add_argument("--local-epochs", type=int, default=5)
    ap.add_argument("--delay", type=float, help="straggler delay in seconds (default: calibrated, 4x training)")
    args = ap.parse_args()
    args.versions = args.versions or math.ceil(args.rounds * CLIENTS / args.buffer_size)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedq-exp-") as tmp:
        delay = args.delay if args.delay is not None else calibrate(args, Path(tmp) / "calibrate")
        print(f"straggler delay {delay:.2f} s; {args.rounds} sync rounds, {args.versions} buffered versions of "
              f"{args.buffer_size}; target {args.target}", flush=True)
        print("| seed | mode | time to target s | final accuracy | commits | total s | straggler slowdown | "
              "load |\n| --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
        for i, seed in enumerate(args.seeds):
            for mode in (("sync", "buffered") if i % 2 == 0 else ("buffered", "sync")):
                r = one(mode, seed, delay, args, Path(tmp) / f"{mode}-{seed}")
                rows.append(r)
                print(f"| {seed} | {mode} | {_fmt(r['to_target'])} | {r['final']:.4f} | {r['commits']} | "
                      f"{r['total']:.1f} | {'-' if r['slowdown'] is None else format(r['slowdown'], '.1f') + 'x'} | "
                      f"{r['load']:.1f} |", flush=True)
    summary(rows, commit)


def summary(rows: list[dict], commit: str) -> None:
    """Medians per mode and the buffered / sync ratio of time to target."""
    med = {}
    for mode in ("sync", "buffered"):
        mine = [r for r in rows if r["mode"] == mode]
        reached = [r["to_target"] for r in mine if r["to_target"] is not None]
        med[mode] = (statistics.median(reached) if len(reached) == len(mine) else None,
                     statistics.median(r["final"] for r in mine), statistics.median(r["load"] for r in mine))
        print(f"median {mode}: time to target {_fmt(med[mode][0])} s, final accuracy {med[mode][1]:.4f}, "
              f"load {med[mode][2]:.1f}")
    if med["sync"][0] and med["buffered"][0]:
        print(f"buffered / sync time to target: {med['buffered'][0] / med['sync'][0]:.2f}; final accuracy "
              f"difference {100 * (med['buffered'][1] - med['sync'][1]):+.1f} points")
    print(f"date {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, commit {commit}, "
          f"{os.cpu_count()} cores")


if __name__ == "__main__":
    main()
