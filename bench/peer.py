"""fedq against Flower on the same workload, side by side: round time, ratios, peak server memory.

Each repeat runs, for each client count, a fedq federation (bench/round_overhead.py's lean
aggregator: no central evaluation, no-op clients, one process per client) and a Flower one
(bench/flower_peer.py: legacy ``start_server``/``start_client``, gRPC bidi, FedAvg, no-op
clients, one process per client), alternating which goes first; the load average is recorded
beside each run. It prints the medians over repeats of each one's median round (rounds 2+) and
the ratios: fedq / Flower, fedq / its floor (N x one push + fetch + decode + fold), and the
aggregator's peak RSS over Flower's server's.

fedq's processes, and the floor in this process, run with the malloc tunables fedq starts its
processes with (fedq.roles.runner.with_malloc_tunables); Flower's run in the environment the bench
was started with, as its users would run them (``--flower-fedq-malloc`` gives them the tunable
too: at 25M it halves Flower's round). fedq's Redis runs in a session of its own, as ``fedq run``
starts its private Redis. Flower's server stays in the bench's: in a session of its own its round
moved within noise, and with two CPU burners and 50 clients its run hung (2 of 2 tries; 2 of 2
completed in the bench's session).

Flower is a benchmark-only dependency, in its own virtual environment (build/ is git-ignored):

    python3 -m venv build/flower-venv && build/flower-venv/bin/pip install "flwr==1.42.0" numpy
    python bench/peer.py --model 1m --clients 10 50 --repeats 3
    python bench/peer.py --model 25m --clients 10 --repeats 3 --rounds 4
    python bench/peer.py --model 1m --clients 10 --repeats 3 --burn 2   # the machine busy: 2 CPU burners
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.round_overhead import _hwm_kib, measure_fedq, outer_env, same_malloc_as_fedq  # noqa: E402
from fedq.roles.localredis import die_with_parent  # noqa: E402
from fedq.settings import Settings  # noqa: E402

PARAMS = {"1m": 1_000_000, "25m": 25_000_000}
FEATURES, CLASSES = 30, 2  # the built-in data set, which fedq's benchmark runs use


def shapes(params: int) -> list[list[int]]:
    """The tensors of bench.bench_models' dense model on the built-in data (fedq's run)."""
    hidden = max(1, params // (FEATURES + 1 + CLASSES))
    return [[FEATURES, hidden], [hidden], [hidden, CLASSES], [CLASSES]]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure_flower(python: str, n: int, params: int, rounds: int, fedq_malloc: bool = False,
                   timeout: float = 900) -> dict[str, float]:
    """Median round (rounds 2+) and the server's peak RSS of a Flower federation of n processes,
    in the environment the bench was started with (fedq_malloc: with fedq's malloc tunable)."""
    port, spec = _port(), json.dumps(shapes(params))
    out = Path(tempfile.mkdtemp(prefix="fedq-peer-")) / "flower.json"
    script = str(ROOT / "bench" / "flower_peer.py")
    env = dict(os.environ if fedq_malloc else outer_env(), GRPC_VERBOSITY="ERROR", PYTHONWARNINGS="ignore")
    server = subprocess.Popen([python, script, "server", str(port), str(n), str(rounds), spec, str(out)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
    clients = [subprocess.Popen([python, script, "client", str(port), spec], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, preexec_fn=die_with_parent) for _ in range(n)]
    peak = [0]

    def sample() -> None:
        while server.poll() is None:
            peak[0] = max(peak[0], _hwm_kib(server.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        server.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in [server, *clients]:
            p.kill()
        raise SystemExit(f"Flower run with {n} clients did not finish {rounds} rounds in {timeout:g} s "
                         "(--flower-timeout); its server and clients were stopped") from None
    finally:
        for c in clients:
            try:
                c.wait(timeout=30)
            except subprocess.TimeoutExpired:
                c.kill()
    sampler.join()
    ends = json.loads(out.read_text())["round_ends"]
    if len(ends) != rounds:
        raise SystemExit(f"Flower run with {n} clients finished {len(ends)} of {rounds} rounds")
    return {"median_s": statistics.median(b - a for a, b in itertools.pairwise(ends)), "peak_rss_mib": peak[0] / 1024}


def burners(count: int) -> list[subprocess.Popen]:
    """CPU burners (the busy-machine variant): one busy loop per process."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=die_with_parent)
            for _ in range(count)]


def main() -> None:
    same_malloc_as_fedq()  # for fedq's processes and the floor; Flower's run as started (--flower-fedq-malloc)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(PARAMS), default="1m")
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--burn", type=int, default=0, help="CPU burner processes running throughout (busy machine)")
    ap.add_argument("--flower-fedq-malloc", action="store_true",
                    help="run Flower's processes with fedq's malloc tunable too (huge pages for large buffers)")
    ap.add_argument("--flower-timeout", type=float, default=900,
                    help="seconds a Flower run may take before the benchmark stops with an error "
                         "(one busy 50-client run hung with every process idle)")
    ap.add_argument("--flower-python", default=str(ROOT / "build" / "flower-venv" / "bin" / "python"))
    args = ap.parse_args()
    hogs = burners(args.burn)
    runs: dict[tuple[int, str], list[dict[str, float]]] = {}
    try:
        for rep in range(args.repeats):
            for n in args.clients:
                order = ["fedq", "flower"] if rep % 2 == 0 else ["flower", "fedq"]
                for who in order:
                    load = os.getloadavg()[0]
                    if who == "fedq":
                        row = measure_fedq(n, args.model, args.rounds, Settings().chunk_bytes, threads_over=10 ** 6,
                                           central_eval=False)
                    else:
                        row = measure_flower(args.flower_python, n, PARAMS[args.model], args.rounds,
                                             args.flower_fedq_malloc, args.flower_timeout)
                    row["load"] = (load + os.getloadavg()[0]) / 2
                    runs.setdefault((n, who), []).append(row)
                    print(f"repeat {rep + 1} N={n} {who:>6}: round {row['median_s'] * 1e3:8.1f} ms, "
                          f"peak RSS {row['peak_rss_mib']:7.0f} MiB, load {row['load']:.1f}", flush=True)
    finally:
        for h in hogs:
            h.kill()
    report(args, runs)


def report(args: argparse.Namespace, runs: dict[tuple[int, str], list[dict[str, float]]]) -> None:
    """Medians over repeats and the ratios."""
    print(f"\nmodel {args.model}, {args.rounds} rounds (medians of rounds 2+), medians of {args.repeats} repeats"
          f"{f', {args.burn} CPU burners' if args.burn else ''}"
          f"{', Flower with fedq malloc tunable' if args.flower_fedq_malloc else ''}")
    print(f"{'N':>4} {'fedq ms':>9} {'flower ms':>10} {'fedq/flower':>11} {'fedq/floor':>10} "
          f"{'agg MiB':>8} {'flower MiB':>10} {'RSS ratio':>9} {'load':>10}")
    rows = []
    for n in args.clients:
        f, w = runs[(n, "fedq")], runs[(n, "flower")]
        med = {k: statistics.median(r[k] for r in f) for k in ("median_s", "floor_s", "peak_rss_mib")}
        fl = {k: statistics.median(r[k] for r in w) for k in ("median_s", "peak_rss_mib")}
        per_repeat = [a["median_s"] / b["median_s"] for a, b in zip(f, w)]
        loads = [r["load"] for r in f + w]
        row = {"clients": n, "fedq_s": med["median_s"], "flower_s": fl["median_s"],
               "ratio": statistics.median(per_repeat), "ratios": per_repeat,
               "floor_ratio": statistics.median(r["median_s"] / r["floor_s"] for r in f),
               "fedq_rss_mib": med["peak_rss_mib"], "flower_rss_mib": fl["peak_rss_mib"],
               "rss_ratio": med["peak_rss_mib"] / fl["peak_rss_mib"], "load": [min(loads), max(loads)]}
        rows.append(row)
        print(f"{n:>4} {row['fedq_s'] * 1e3:>9.1f} {row['flower_s'] * 1e3:>10.1f} {row['ratio']:>11.2f} "
              f"{row['floor_ratio']:>10.2f} {row['fedq_rss_mib']:>8.0f} {row['flower_rss_mib']:>10.0f} "
              f"{row['rss_ratio']:>9.3f} {min(loads):>4.1f}-{max(loads):<4.1f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
