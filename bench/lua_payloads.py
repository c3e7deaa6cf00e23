"""What a large value costs Redis when it passes through a Lua script, against the plain command.

Why fedq's round steps never hand a model or an update to Lua (fedq/protocol/scripts.py): on a
throwaway redis-server, each operation is repeated on a value of --mib MiB and Redis's own CPU
(INFO cpu, user + system) is read before and after, so the figure is the server's work alone;
plain and scripted operations are interleaved, --repeats times, and the medians printed with
the ratio.

    python bench/lua_payloads.py --mib 4 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.round_overhead import tcp_redis  # noqa: E402


def server_cpu(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def per_op_ms(r: redis.Redis, op: Callable[[], object], times: int) -> float:
    """Redis CPU per call of op, in ms."""
    before = server_cpu(r)
    for _ in range(times):
        op()
    return (server_cpu(r) - before) / times * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=float, default=4.0, help="value size in MiB (a 1M-parameter float32 model: 4)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--times", type=int, default=20, help="calls per measurement")
    args = ap.parse_args()
    value = os.urandom(int(args.mib * (1 << 20)))
    with tcp_redis() as url:
        r = redis.Redis.from_url(url)
        r.set("v", value)
        r.hset("h", "payload", value)
        lua_set = r.register_script("return redis.call('HSET', KEYS[1], 'payload', ARGV[1])")
        lua_get = r.register_script("return redis.call('HGET', KEYS[1], 'payload')")
        pairs = {
            "store (SET / HSET via Lua)": (lambda: r.set("w", value), lambda: lua_set(keys=["h2"], args=[value])),
            "read (GET / HGET via Lua)": (lambda: r.get("v"), lambda: lua_get(keys=["h"])),
        }
        results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in pairs}
        for _ in range(args.repeats):
            for name, (plain, scripted) in pairs.items():
                results[name][0].append(per_op_ms(r, plain, args.times))
                results[name][1].append(per_op_ms(r, scripted, args.times))
    print(f"{args.mib:g} MiB values, Redis CPU per operation (median of {args.repeats}), load {os.getloadavg()[0]:.1f}")
    print(f"{'operation':28} {'plain ms':>9} {'via Lua ms':>11} {'ratio':>6}")
    for name, (plain_ms, lua_ms) in results.items():
        p, q = statistics.median(plain_ms), statistics.median(lua_ms)
        print(f"{name:28} {p:9.2f} {q:11.2f} {q / p:6.1f}")


if __name__ == "__main__":
    main()
