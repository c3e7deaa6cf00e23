"""A model of 250M float32 parameters (1 GB) federated by 4 clients through Redis.

The real aggregator (``fedq aggregator``, an rq worker, run without central evaluation so
it never loads TensorFlow) and 4 real client loops as processes against a redis-server on
127.0.0.1; training is a no-op (each client sends back the global model it fetched), so what
is measured is the transport and the aggregation: every model goes as 16 MiB parts, the
aggregator folds them into its float64 sum as it reads them and writes the next global model
out part by part from that sum.

Reported: each round's wall time; the peak RSS (VmHWM) of the aggregator's work horse, of
the rq worker around it, and of the child process that built the initial model with Keras
(it exits before round 1); the clients' peaks; Redis's peak memory.

    python bench/big_model.py                    # 250M parameters, 4 clients, 2 rounds
    python bench/big_model.py --model 25m --rounds 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.round_overhead import MODELS, _descendants, _hwm_kib, _role, tcp_redis, wait_all  # noqa: E402
from fedq.learning.spec import RunSpec  # noqa: E402
from fedq.protocol.connection import connect  # noqa: E402
from fedq.protocol.store import RunStore  # noqa: E402
from fedq.roles.jobs import submit_run  # noqa: E402
from fedq.roles.localredis import die_with_parent  # noqa: E402
from fedq.roles.runner import with_malloc_tunables  # noqa: E402
from fedq.settings import Settings  # noqa: E402

MODELS = {**MODELS, "250m": "bench.bench_models:dense_250m"}


def run(model: str, clients: int, rounds: int, chunk_bytes: int) -> dict[str, object]:
    with tcp_redis() as url:
        settings = Settings.from_env(env={}, redis_url=url)
        r = connect(settings)
        spec = RunSpec(clients=clients, rounds=rounds, local_epochs=1, model=MODELS[model], central_eval=False,
                       run_id=f"big-{model}").validate()
        submit_run(r, settings, spec, queue="big")
        env = with_malloc_tunables(dict(os.environ, FEDQ_REDIS_URL=url, FEDQ_LOG_LEVEL="WARNING",
                                        FEDQ_BLOCK_SECONDS="0.5", FEDQ_CHUNK_BYTES=str(chunk_bytes),
                                        FEDQ_MAX_UPDATE_BYTES=str(4 << 30), PYTHONPATH=str(ROOT)))
        agg = subprocess.Popen([sys.executable, "-m", "fedq", "aggregator", "--queue", "big", "--burst"],
                               env=env, cwd=ROOT, preexec_fn=die_with_parent)
        procs = [subprocess.Popen([sys.executable, str(ROOT / "bench" / "round_overhead.py"), "--client", url,
                                   spec.run_id, str(k)], env=env, cwd=ROOT, preexec_fn=die_with_parent)
                 for k in range(clients)]
        peaks: dict[str, int] = {}
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                for pid in [agg.pid, *_descendants(agg.pid)]:
                    role = _role(pid, agg.pid)
                    peaks[role] = max(peaks.get(role, 0), _hwm_kib(pid))
                for k, p in enumerate(procs):
                    peaks[f"client-{k}"] = max(peaks.get(f"client-{k}", 0), _hwm_kib(p.pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        store = RunStore(r, spec.run_id)
        wait_all(agg, procs, store, 3600)
        done.set()
        sampler.join()
        state = store.state()
        if state.get("status") != "finished":
            raise SystemExit(f"run ended {state.get('status')}: {state.get('reason')}")
        return {"model": model, "parameters": _parameters(store), "clients": clients,
                "wall_s": time.perf_counter() - t0,
                "round_s": [round(m["seconds"], 2) for m in store.metrics()],
                "peak_mib": {k: round(v / 1024) for k, v in sorted(peaks.items()) if k not in ("gone", "other")},
                "redis_peak_mib": round(int(r.info("memory")["used_memory_peak"]) / 2 ** 20)}


def _parameters(store: RunStore) -> int:
    from fedq.protocol import transfer

    return sum(math.prod(t.shape) for t in transfer.global_template(store)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="250m")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--chunk-bytes", type=int, default=Settings().chunk_bytes)
    args = ap.parse_args()
    row = run(args.model, args.clients, args.rounds, args.chunk_bytes)
    peaks = row["peak_mib"]
    print(f"model {row['model']} ({row['parameters']:,} parameters, {row['parameters'] * 4 / 2 ** 30:.2f} GiB "
          f"float32), {row['clients']} clients, rounds of {row['round_s']} s")
    print(f"aggregator work horse peak RSS {peaks.get('horse', 0):,} MiB; rq worker {peaks.get('worker', 0):,} MiB; "
          f"initial-model builder {peaks.get('builder', 0):,} MiB (exits before round 1)")
    print(f"clients' peak RSS {max(v for k, v in peaks.items() if k.startswith('client'))} MiB each at most; "
          f"Redis peak {row['redis_peak_mib']:,} MiB")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
