"""Final test accuracy, error and bytes of `fedq run --compression none|float16|int8`, same seeds.

Every run is a real federation (`fedq run`: its own Redis, an aggregator and N client
processes) on the built-in data unless data options are passed through. Not part of the test
suite (each run takes 20-60 s on 2 cores).

    python experiments/compression_accuracy.py                           # seeds 0-2, defaults of fedq run
    python experiments/compression_accuracy.py --seeds 0 -- --model bench.bench_models:dense_1m --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENCODINGS = ("none", "float16", "int8")


def run(encoding: str, seed: int, extra: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "fedq", "run", "--compression", encoding, "--seed", str(seed), "--out", str(out),
           *extra]
    env = {k: v for k, v in os.environ.items() if k != "FEDQ_REDIS_URL"} | {"FEDQ_LOG_LEVEL": "WARNING"}
    t0 = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"accuracy": report["final"]["test_accuracy"], "seconds": time.monotonic() - t0, **report["compression"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--encodings", nargs="+", choices=ENCODINGS, default=list(ENCODINGS))
    ap.add_argument("extra", nargs="*", help="further `fedq run` options, after --")
    args = ap.parse_args()
    print("| seed | encoding | final test accuracy | error max | error mean | tensor bytes / float32 | "
          "bytes on the wire | seconds |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="fedq-exp-") as tmp:
        for seed in args.seeds:
            for enc in args.encodings:
                r = run(enc, seed, args.extra, Path(tmp) / f"{enc}-{seed}")
                err = "- | -" if r["error_max"] is None else f"{r['error_max']:.2e} | {r['error_mean']:.2e}"
                print(f"| {seed} | {enc} | {r['accuracy']:.4f} | {err} | "
                      f"{r['ratio']:.3f} | {r['payload_bytes']:,} | {r['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
