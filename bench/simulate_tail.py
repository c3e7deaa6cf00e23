"""The 1,000-client tail: ``fedq simulate`` repeated, with round time per update and push latency.

Each repeat is one ``fedq simulate --clients N --rounds R`` (its own private Redis, clients as
threads in processes, 100 to a process by default). From its output it takes the round time
per update (rounds 2+); from the clients' logs every push's latency (each client logs
``pushed ... in X ms``: encoding and the push to Redis, rounds 2+), and prints p50, p99 and the
slowest push per repeat, with the load average before and after.

    python bench/simulate_tail.py --clients 1000 --rounds 3 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PUSHED = re.compile(r" round (\d+): .* pushed \d+ bytes.* in ([\d.]+) ms")
PER_UPDATE = re.compile(r"([\d.]+) ms of round time per update")


def push_latencies(logs: Path, first_round: int = 2) -> list[float]:
    """Milliseconds of every push the clients logged from first_round on."""
    out = []
    for path in logs.glob("*.log"):
        for line in path.read_text(errors="replace").splitlines():
            m = PUSHED.search(line)
            if m and int(m.group(1)) >= first_round:
                out.append(float(m.group(2)))
    return out


def one(clients: int, rounds: int, processes: int) -> dict[str, float]:
    """One `fedq simulate` run (processes 0: its default spread) and its figures."""
    out = Path(tempfile.mkdtemp(prefix="fedq-tail-"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), FEDQ_LOG_LEVEL="INFO")
    env.pop("FEDQ_REDIS_URL", None)  # a private Redis, as `fedq simulate` starts by default
    load = os.getloadavg()[0]
    spread = ["--processes", str(processes)] if processes else []  # else fedq simulate's default
    done = subprocess.run([sys.executable, "-m", "fedq", "simulate", "--clients", str(clients), "--rounds",
                           str(rounds), *spread, "--out", str(out)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    m = PER_UPDATE.search(done.stdout)
    if done.returncode or m is None:
        raise SystemExit(f"fedq simulate failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    pushes = np.array(push_latencies(out / "logs"))
    return {"per_update_ms": float(m.group(1)), "pushes": float(len(pushes)),
            "p50_ms": float(np.percentile(pushes, 50)), "p99_ms": float(np.percentile(pushes, 99)),
            "max_ms": float(pushes.max()), "load": (load + os.getloadavg()[0]) / 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--processes", type=int, default=0, help="client processes (default: fedq simulate's)")
    args = ap.parse_args()
    spread = f"{args.processes} processes" if args.processes else "fedq simulate's default processes"
    print(f"{args.clients} clients, {args.rounds} rounds, {spread}; pushes of rounds 2+")
    print(f"{'repeat':>6} {'ms/update':>9} {'pushes':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>8} {'load':>5}")
    for rep in range(args.repeats):
        r = one(args.clients, args.rounds, args.processes)
        print(f"{rep + 1:>6} {r['per_update_ms']:>9.2f} {r['pushes']:>6.0f} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} "
              f"{r['max_ms']:>8.1f} {r['load']:>5.1f}", flush=True)


if __name__ == "__main__":
    main()
