"""Why simulated clients stalled: many threads waking at once, each waiting for the interpreter's lock.

N threads of one process (fedq simulate's clients) block on one event (a commit); each wake-up
they read the state, then "push": noise on a 1.5 KB model, its SHA-256, one HSET, timed from
the end of the state read to the push's reply, as the client logs a push. Run at Python's
default switch interval (5 ms) and at 0.5 ms (fedq simulate's before its clients took turns),
interleaved, each in a fresh process, against a private redis-server.

    python bench/switch_interval.py --threads 250 --repeats 2
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.round_overhead import tcp_redis  # noqa: E402

WAKES = 3
SWITCH_INTERVAL = 0.0005


def threads_at(url: str, threads: int) -> list[float]:
    """Push latencies (ms) of `threads` threads woken WAKES times (this process's switch interval)."""
    wake, lock, out = threading.Event(), threading.Lock(), []

    def client(k: int) -> None:
        r = redis.Redis.from_url(url)
        rng = np.random.default_rng(k)
        model = [np.zeros((20, 16), np.float32), np.zeros(16, np.float32), np.zeros((16, 2), np.float32)]
        for _ in range(WAKES):
            wake.wait()
            r.hgetall("state")
            t0 = time.perf_counter()
            payload = b"".join((t + rng.normal(0, 1e-3, t.shape)).astype(t.dtype).tobytes() for t in model)
            r.hset(f"update:{k}", mapping={"payload": payload, "digest": hashlib.sha256(payload).hexdigest()})
            with lock:
                out.append((time.perf_counter() - t0) * 1000)
        r.close()

    workers = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    time.sleep(2)  # all connected and waiting
    for _ in range(WAKES):
        wake.set()
        time.sleep(0.3)
        wake.clear()
        time.sleep(1.5)
    for w in workers:
        w.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", nargs=2, metavar=("URL", "SWITCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.setswitchinterval(float(args.child[1]))
        a = np.array(threads_at(args.child[0], args.threads))
        print(f"{float(args.child[1]) * 1000:>9g} {len(a):>6} {np.percentile(a, 50):>7.1f} "
              f"{np.percentile(a, 99):>7.1f} {a.max():>7.1f} {os.getloadavg()[0]:>5.1f}", flush=True)
        return
    print(f"{args.threads} threads, {WAKES} wake-ups; push latency in ms")
    print(f"{'switch ms':>9} {'pushes':>6} {'p50':>7} {'p99':>7} {'max':>7} {'load':>5}", flush=True)
    with tcp_redis() as url:
        for _ in range(args.repeats):
            for switch in (0.005, SWITCH_INTERVAL):
                subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--child", url,
                                repr(switch)], check=True)


if __name__ == "__main__":
    main()
