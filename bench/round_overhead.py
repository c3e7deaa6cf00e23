"""Round overhead: the part of a federated round that is not training, measured side by side.

Runs the real aggregator (``fedq aggregator``, an rq worker that also evaluates centrally) and
N real client loops as separate processes against a redis-server on 127.0.0.1, with local
training replaced by a no-op trainer that returns the global weights unchanged, so a round's
wall time is exactly the machinery: wake-up, fetch and decode of the global model, encode and
push of N updates, validation and FedAvg, central evaluation, close and commit.

Reported beside each measurement, from the same run:
- floor: N x (one push + fetch + decode + accumulate of one update, measured alone in-process);
- seed: the Kubeflow example's transport (a Flask server receiving weights as JSON form
  fields, bench/seed_flask.py) for the same N and model;
- the aggregator's peak RSS (its work horse's VmHWM).

    python bench/round_overhead.py                   # seed model, N = 2 and 10
    python bench/round_overhead.py --model 1m --clients 10 --seed-compare --repeats 3

The seed comparison times two harnesses after each fedq run: the seed's own way (client
processes that encode their weights as JSON every round and decode the reply into arrays) and
a lean one (threads posting a body encoded once, parsing only the reply's JSON), which leaves
the transport and the server; with --repeats, the medians over the interleaved repeats.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedq.learning.aggregate import FedAvg  # noqa: E402
from fedq.learning.spec import RunSpec  # noqa: E402
from fedq.protocol import codec, messages, transfer  # noqa: E402
from fedq.protocol.connection import connect  # noqa: E402
from fedq.protocol.store import RunStore  # noqa: E402
from fedq.roles.client import Client  # noqa: E402
from fedq.roles.jobs import submit_run  # noqa: E402
from fedq.roles.localredis import die_with_parent, find_server  # noqa: E402
from fedq.roles.runner import with_malloc_tunables  # noqa: E402
from fedq.roles.swarm import client_commands, noise_trainers  # noqa: E402
from fedq.settings import Settings  # noqa: E402

MODELS = {"seed": "seed", "1m": "bench.bench_models:dense_1m", "25m": "bench.bench_models:dense_25m"}


def client_main(url: str, run_id: str, shard: int) -> None:
    """One client whose training is a no-op: its update is the global model it received."""
    settings = Settings.from_env(redis_url=url, block_seconds=0.5)  # FEDQ_CHUNK_BYTES from the bench
    r = connect(settings)
    Client(r, settings, shard, run_id=run_id,
           trainer_factory=noise_trainers(RunStore(r, run_id), scale=0)).serve(once=True)


@contextmanager
def tcp_redis() -> Iterator[str]:
    """A throwaway redis-server on a free 127.0.0.1 port (TCP, as pods would use), in a session
    of its own as `fedq run` starts its private one (fedq.roles.localredis): with the kernel's
    autogroup scheduling, N client processes then share the CPU with it as one group would,
    not as N to one (a pod's Redis has CPU of its own, too)."""
    import socket
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = tempfile.mkdtemp(prefix="fedq-bench-")
    proc = subprocess.Popen([find_server(), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", d], stdout=subprocess.DEVNULL,
                            preexec_fn=die_with_parent, start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    r = redis.Redis.from_url(url)
    for _ in range(200):
        try:
            r.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    path = Path(f"/proc/{pid}/task/{pid}/children")
    if path.exists():
        for child in (int(c) for c in path.read_text().split()):
            out += [child, *_descendants(child)]
    return out


def _hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _role(pid: int, worker: int) -> str:
    """worker (the rq worker), horse (its forked job), builder (the initial model's child)."""
    if pid == worker:
        return "worker"
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return "gone"
    if b"spawn_main" in cmdline:
        return "builder"
    return "horse" if parent == worker else "other"


def measure_fedq(n: int, model: str, rounds: int, chunk_bytes: int, threads_over: int,
                 central_eval: bool = True, **spec_extra: object) -> dict[str, float]:
    with tcp_redis() as url:
        settings = Settings.from_env(env={}, redis_url=url)
        r = connect(settings)
        spec = RunSpec(clients=n, rounds=rounds, local_epochs=1, model=MODELS[model], run_id=f"bench-{n}",
                       central_eval=central_eval, **spec_extra).validate()  # type: ignore[arg-type]
        queue = f"bench-{n}"
        submit_run(r, settings, spec, queue=queue)
        env = with_malloc_tunables(dict(os.environ, FEDQ_REDIS_URL=url, FEDQ_LOG_LEVEL="WARNING",
                                        FEDQ_BLOCK_SECONDS="0.5", FEDQ_CHUNK_BYTES=str(chunk_bytes),
                                        PYTHONPATH=str(ROOT)))
        agg = subprocess.Popen([sys.executable, "-m", "fedq", "aggregator", "--queue", queue, "--burst"],
                               env=env, cwd=ROOT, preexec_fn=die_with_parent)
        if n <= threads_over:  # one process per client, as pods would run them
            commands = [[__file__, "--client", url, spec.run_id, str(k)] for k in range(n)]
        else:  # many clients: threads in four processes (fedq simulate's workers), no-op updates
            commands = [["-m", "fedq", *args] for _, args in client_commands(spec, 4, scale=0)]
        clients = [subprocess.Popen([sys.executable, *c], env=env, cwd=ROOT, preexec_fn=die_with_parent)
                   for c in commands]
        peak = [0]
        done = threading.Event()

        def sample() -> None:  # the work horse is a child of the worker: track its high-water mark
            while not done.is_set():
                for pid in [agg.pid, *_descendants(agg.pid)]:
                    if _role(pid, agg.pid) in ("worker", "horse"):  # not the initial model's builder
                        peak[0] = max(peak[0], _hwm_kib(pid))
                time.sleep(0.05)

        cpu_base: dict[int, float] = {}  # each client's CPU seconds when round 1 was committed

        def baseline() -> None:  # rounds 2+ are measured: start-up and round 1 are left out
            while not done.is_set() and RunStore(r, spec.run_id).committed_round() < 1:
                time.sleep(0.05)
            cpu_base.update({c.pid: _cpu_seconds(c.pid) for c in clients})

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        threading.Thread(target=baseline, daemon=True).start()
        cpu_end: dict[int, float] = {}
        wait_all(agg, clients, RunStore(r, spec.run_id), 1800, cpu_end)
        done.set()
        store = RunStore(r, spec.run_id)
        metrics = store.metrics()[1:]  # round 1 includes start-up and TF tracing
        _, names, tensors = transfer.read_global(store)
        secs = [m["seconds"] for m in metrics]
        stats = r.info("stats")  # every byte any process sent Redis or read from it, over all rounds
        return {"median_s": statistics.median(secs), "peak_rss_mib": peak[0] / 1024,
                "floor_s": n * floor_one(r, tensors, names),
                "redis_mib_per_round": (stats["total_net_input_bytes"] + stats["total_net_output_bytes"])
                / rounds / 2 ** 20,
                # user + system CPU of a client process per round (rounds 2+), the mean over the clients
                "client_cpu_s": statistics.mean(cpu_end[p] - cpu_base[p] for p in cpu_base if p in cpu_end)
                / max(1, rounds - 1) if cpu_base and n <= threads_over else float("nan")}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_all(agg: subprocess.Popen, clients: list[subprocess.Popen], store: RunStore, timeout: float,
             cpu: dict[int, float] | None = None) -> None:
    """Wait for the aggregator and the clients; stop with the run's state when one fails, or
    when the aggregator is gone and the run did not finish (the clients would wait forever).
    With ``cpu``, the clients are reaped here (wait4) and each one's user + system CPU seconds kept in it."""
    deadline = time.monotonic() + timeout

    def code(p: subprocess.Popen) -> int | None:
        if cpu is None or p is agg or p.returncode is not None:
            return p.poll()
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            cpu[p.pid] = usage.ru_utime + usage.ru_stime
        return p.returncode

    while any(code(p) is None for p in [agg, *clients]):
        failed = [p for p in [agg, *clients] if code(p) not in (None, 0)]
        state = store.state()
        if failed or (agg.poll() is not None and state.get("status") != "finished") or time.monotonic() > deadline:
            for p in [agg, *clients]:
                p.kill()
            raise SystemExit(f"benchmark run {state.get('status')} ({state.get('reason') or 'no reason'}); "
                             f"exit codes {[p.wait() for p in [agg, *clients]]}")
        time.sleep(0.5)


def floor_one(r: redis.Redis, tensors: list[np.ndarray], names: list[str], repeat: int = 21, warmup: int = 5) -> float:
    """One update's push + fetch + decode + accumulate, alone, in this process: the median of
    repeat timings after warmup untimed ones. Warm, as a running aggregator's are: the first few
    pay for fresh memory (page faults) until the allocator keeps 4 MB buffers, and they swung a
    median of 5 between 6 and 9 ms a 1M update where the warm figure is 4-5 ms (this process
    runs with fedq's malloc tunable, see same_malloc_as_fedq)."""
    store = RunStore(r, "floor")
    times = []
    acc = FedAvg(tensors)
    for i in range(warmup + repeat):
        t0 = time.perf_counter()
        payload = messages.encode_update("floor", 1, "c", 10, {}, names, tensors)
        r.hset(store.k.update("c", 1), "payload", payload)
        got = r.hget(store.k.update("c", 1), "payload")
        env = codec.decode(got)
        acc.add(env.tensors, 10)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    r.delete(store.k.update("c", 1))
    return statistics.median(times)


def _seed_client(url: str, tensors: list[np.ndarray], rounds: int, start: mp.Barrier, end: mp.Barrier) -> None:
    import requests

    for _ in range(rounds):
        start.wait()
        data = {"local_count": "100", "bs": "32", "local_weight": json.dumps([t.tolist() for t in tensors])}
        reply = requests.post(url, data=data, timeout=600)
        [np.array(x) for x in json.loads(reply.json()["result"])]
        end.wait()


def _seed_lean_client(url: str, body: bytes, rounds: int, start: threading.Barrier, end: threading.Barrier) -> None:
    import requests

    session = requests.Session()
    for _ in range(rounds):
        start.wait()
        reply = session.post(url, data=body, timeout=600,
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
        json.loads(reply.json()["result"])  # the average, parsed (not turned into arrays)
        end.wait()


def _seed_rounds(n: int, rounds: int, start: object, end: object) -> float:
    """Median of rounds timed between the barriers the n clients wait on."""
    times = []
    for _ in range(rounds):
        start.wait()  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        end.wait()  # type: ignore[attr-defined]
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_seed(n: int, tensors: list[np.ndarray], rounds: int, lean: bool = False) -> float:
    """Median round time of the seed's Flask + JSON transport for n clients.

    As the seed runs it (lean False): n client processes, each encoding its weights as JSON
    form fields every round and decoding the reply into arrays. Lean: n threads of this
    process posting a body encoded once before timing, and parsing the reply's JSON only; what
    is left is the transport and the server (both ways favour the seed over its own code)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, str(ROOT / "bench" / "seed_flask.py"), str(port), str(n)],
                              preexec_fn=die_with_parent)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/data"
        workers: list[threading.Thread] | list[mp.process.BaseProcess]
        if lean:
            from urllib.parse import urlencode

            body = urlencode({"local_count": "100", "bs": "32",
                              "local_weight": json.dumps([t.tolist() for t in tensors])}).encode()
            start, end = threading.Barrier(n + 1), threading.Barrier(n + 1)
            workers = [threading.Thread(target=_seed_lean_client, args=(url, body, rounds, start, end), daemon=True)
                       for _ in range(n)]
        else:
            ctx = mp.get_context("fork")
            start, end = ctx.Barrier(n + 1), ctx.Barrier(n + 1)
            workers = [ctx.Process(target=_seed_client, args=(url, tensors, rounds, start, end)) for _ in range(n)]
        for w in workers:
            w.start()
        median = _seed_rounds(n, rounds, start, end)
        for w in workers:
            w.join(timeout=60)
        return median
    finally:
        server.terminate()
        server.wait(timeout=10)


OUTER_TUNABLES = "FEDQ_BENCH_OUTER_GLIBC_TUNABLES"  # GLIBC_TUNABLES as the bench was started ("-": unset)


def same_malloc_as_fedq() -> None:
    """Run this benchmark under the malloc tunables fedq starts its processes with (re-executing
    it once when the environment lacks it), so that the floor, measured in this process, pays
    for memory as the aggregator and clients do. The environment it was started with is kept
    in OUTER_TUNABLES, for processes that are not fedq's (outer_env)."""
    env = with_malloc_tunables(dict(os.environ))
    if env != dict(os.environ):
        env[OUTER_TUNABLES] = os.environ.get("GLIBC_TUNABLES", "-")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def outer_env() -> dict[str, str]:
    """This process's environment with GLIBC_TUNABLES as the bench was started (not fedq's
    tunable, which same_malloc_as_fedq added): for another framework's processes, run as its
    users would run them."""
    env = dict(os.environ)
    outer = env.pop(OUTER_TUNABLES, None)
    if outer == "-":
        env.pop("GLIBC_TUNABLES", None)
    elif outer is not None:
        env["GLIBC_TUNABLES"] = outer
    return env


def main() -> None:
    same_malloc_as_fedq()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[2, 10])
    ap.add_argument("--model", choices=sorted(MODELS), default="seed")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=1, help="repeats, interleaved; medians over them are printed")
    ap.add_argument("--seed-compare", action="store_true",
                    help="also time the seed's Flask/JSON transport, as the seed runs it and lean")
    ap.add_argument("--chunk-bytes", type=int, default=Settings().chunk_bytes,
                    help="FEDQ_CHUNK_BYTES of the run: larger models travel in parts")
    ap.add_argument("--threads-over", type=int, default=10,
                    help="above this many clients, run them as threads in four processes")
    ap.add_argument("--no-central-eval", action="store_true",
                    help="run without central evaluation (the lean aggregator: no TensorFlow, no global copy)")
    ap.add_argument("--client", nargs=3, metavar=("URL", "RUN", "SHARD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        client_main(args.client[0], args.client[1], int(args.client[2]))
        return
    print(f"model {args.model}; {args.rounds} rounds, medians of rounds 2+"
          f"{'; no central evaluation' if args.no_central_eval else ''}")
    print(f"{'rep':>3} {'clients':>7} {'round ms':>9} {'floor ms':>9} {'ratio':>6} {'agg MiB':>8} {'seed ms':>9} "
          f"{'x':>6} {'lean seed ms':>12} {'x':>6} {'load':>5}")
    rows = []
    for rep in range(args.repeats):
        for n in args.clients:
            rows.append({"repeat": rep + 1, "clients": n, **measure_row(args, n)})
            print_row(rows[-1])
    if args.repeats > 1:
        print("medians over repeats")
        for n in args.clients:
            mine = [r for r in rows if r["clients"] == n]
            print_row({"repeat": 0, "clients": n, **{k: statistics.median(r[k] for r in mine) for k in mine[0]
                                                    if k not in ("repeat", "clients")}})
    print(json.dumps(rows))


def measure_row(args: argparse.Namespace, n: int) -> dict[str, float]:
    """One fedq measurement and, with --seed-compare, both seed harnesses right after it."""
    load = os.getloadavg()[0]
    row = measure_fedq(n, args.model, args.rounds, args.chunk_bytes, args.threads_over,
                       central_eval=not args.no_central_eval)
    if args.seed_compare:
        from fedq.learning.models import build_model  # the same model's tensors, for the seed's transport

        tensors = build_model(MODELS[args.model], 30, 2, 0).get_weights()
        row["seed_s"] = measure_seed(n, tensors, max(3, args.rounds // 2))
        row["seed_lean_s"] = measure_seed(n, tensors, max(3, args.rounds // 2), lean=True)
    row["load"] = (load + os.getloadavg()[0]) / 2
    return row


def print_row(row: dict[str, float]) -> None:
    seed = ""
    if "seed_s" in row:
        seed = (f"{row['seed_s'] * 1e3:>9.1f} {row['seed_s'] / row['median_s']:>5.1f}x "
                f"{row['seed_lean_s'] * 1e3:>12.1f} {row['seed_lean_s'] / row['median_s']:>5.1f}x")
    print(f"{row['repeat'] or '-':>3} {row['clients']:>7} {row['median_s'] * 1e3:>9.1f} {row['floor_s'] * 1e3:>9.1f} "
          f"{row['median_s'] / row['floor_s']:>6.2f} {row['peak_rss_mib']:>8.0f} {seed or ' ' * 49} "
          f"{row['load']:>5.1f}", flush=True)


if __name__ == "__main__":
    main()
