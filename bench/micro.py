"""Micro-benchmarks, each a ratio measured side by side in one run (the machine is shared):

- codec: encode + decode of a model against ``np.copyto`` of the same bytes (target <= 2x),
  in processes with glibc's huge-page tunable (as fedq starts its processes) and without;
- aggregation: fedq's FedAvg fold against numpy's in-place accumulate of the same arrays
  (target <= 1.3x).

    python bench/micro.py [--params 1000000 25000000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from fedq.learning.aggregate import FedAvg
from fedq.protocol import codec


def model(params: int, seed: int = 0) -> list[np.ndarray]:
    """A model of about `params` float32 parameters in a few tensors of realistic shapes."""
    rng = np.random.default_rng(seed)
    side = int((params * 0.9) ** 0.5)
    rest = params - side * side
    return [rng.standard_normal((side, side), dtype=np.float32),
            rng.standard_normal(max(rest, 1), dtype=np.float32)]


def best(fn: Callable[[], object], repeat: int, warmup: bool = True) -> float:
    """Median seconds of fn over `repeat` runs, after one warm-up unless told not to."""
    if warmup:
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_codec(params: int, repeat: int) -> tuple[float, float]:
    tensors = model(params)
    dst = [np.empty_like(t) for t in tensors]

    def ours() -> None:
        env = codec.decode(codec.encode("update", tensors))
        assert len(env.tensors) == len(tensors)

    def floor() -> None:
        for d, t in zip(dst, tensors):
            np.copyto(d, t)

    # Interleave the two so both see the same machine load.
    a, b = [], []
    for _ in range(repeat):
        a.append(best(ours, 1))
        b.append(best(floor, 1))
    return statistics.median(a), statistics.median(b)


def bench_aggregate(params: int, repeat: int, n: int = 8) -> tuple[float, float]:
    models = [model(params, seed=i) for i in range(n)]
    counts = [100 + i for i in range(n)]

    def ours() -> None:
        acc = FedAvg(models[0])
        for m, c in zip(models, counts):
            acc.add(m, c)

    sums = [np.zeros(t.shape, np.float64) for t in models[0]]
    scratch = [np.empty(t.shape, np.float64) for t in models[0]]

    def floor() -> None:
        # The same float64 weighted accumulate written directly with numpy, in place.
        for s in sums:
            s.fill(0.0)
        for m, c in zip(models, counts):
            for s, buf, t in zip(sums, scratch, m):
                np.multiply(t, np.float64(c), out=buf)
                s += buf

    a, b = [], []
    for _ in range(repeat):
        a.append(best(ours, 1))
        b.append(best(floor, 1))
    return statistics.median(a), statistics.median(b)


def _codec_in_child(params: int, repeat: int, huge_pages: bool) -> tuple[float, float]:
    """bench_codec in a fresh process with or without glibc's huge-page tunable, which is set
    at process start (fedq.roles.runner.with_malloc_tunables: what fedq run and the image give fedq)."""
    import json
    import os
    import subprocess
    import sys

    from fedq.roles.runner import with_malloc_tunables

    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env = with_malloc_tunables(env) if huge_pages else env
    out = subprocess.run([sys.executable, __file__, "--codec-child", "--params", str(params), "--repeat", str(repeat)],
                         env=env, capture_output=True, text=True, check=True, timeout=1800)
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))  # type: ignore[return-value]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, nargs="+", default=[1_000_000, 25_000_000])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--codec-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.codec_child:
        import json

        print(json.dumps(bench_codec(args.params[0], args.repeat)))
        return
    print(f"{'benchmark':<22} {'params':>11} {'fedq ms':>9} {'floor ms':>9} {'ratio':>6} {'GB/s':>6} target")
    for p in args.params:
        for huge, label in ((True, "codec"), (False, "codec (4 KiB pages)")):
            ours, floor = _codec_in_child(p, args.repeat, huge)
            print(f"{label:<22} {p:>11,} {ours * 1e3:>9.2f} {floor * 1e3:>9.2f} {ours / floor:>6.2f} "
                  f"{p * 4 / ours / 1e9:>6.2f} <= 2.0 (encode+decode vs np.copyto)")
        ours, floor = bench_aggregate(p, args.repeat)
        print(f"{'aggregation':<22} {p:>11,} {ours * 1e3:>9.2f} {floor * 1e3:>9.2f} {ours / floor:>6.2f} "
              f"{8 * p * 4 / ours / 1e9:>6.2f} <= 1.3 (FedAvg of 8 vs numpy in-place)")


if __name__ == "__main__":
    main()
