"""``fedq run``: a whole federation on one machine, with the processes users start by hand."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis

from fedq.errors import FedqError
from fedq.learning.data import load_dataset
from fedq.learning.models import check_model, import_builder, model_kind
from fedq.learning.partition import check_partition
from fedq.learning.spec import RunSpec
from fedq.protocol.connection import connect
from fedq.protocol.store import RunStore
from fedq.protocol.vocabulary import ENDED
from fedq.roles.jobs import submit_run
from fedq.roles.lifecycle import die_with_parent
from fedq.roles.localredis import LocalRedis
from fedq.roles.report import clear_outputs, write_report
from fedq.settings import Settings

log = logging.getLogger("fedq.run")


def check_data(spec: RunSpec) -> None:
    """Fail fast, in this process, on data that the clients could not load or shard, and on a
    model that cannot be imported or built for the data's shape (one line, before anything starts)."""
    ds = load_dataset(spec.data)
    check_partition(spec.data, spec.clients)  # every client gets rows under the chosen partition
    check_model(spec.model, ds.num_features, ds.num_classes)


def data_paths(spec: RunSpec) -> list[str]:
    """The files the run's data is read from (none for built-in and synthetic data)."""
    return [p for p in (spec.data.csv, spec.data.normal_csv, spec.data.abnormal_csv) if p]


def check_submitted(spec: RunSpec) -> None:
    """check_data where the data is readable here; else (the data lives with the clients) the
    model's module is still imported, so that a typo fails now rather than in the aggregator."""
    if all(os.path.exists(p) for p in data_paths(spec)):
        check_data(spec)
    elif model_kind(spec.model) == "builder":
        import_builder(spec.model)


# A payload or part of many MB is a fresh buffer that glibc maps anew, and faulting it in
# 4 KiB pages costs more than copying the bytes (100 MB: ~55 ms of faults, ~9 ms of copy). With
# hugetlb=1 (glibc >= 2.35; others ignore it) malloc asks for transparent huge pages and the
# same buffer costs ~12 ms (python bench/micro.py shows both). Buffers up to mmap_threshold come
# from the heap, and the heap keeps up to trim_threshold of freed memory for the next one: a
# round's 4 MB payloads (1M parameters) then reuse the last round's pages, where glibc's own
# thresholds gave them back and the kernel zeroed fresh ones every round (2 % of the machine's
# CPU in a 10-client round, in the aggregator's page clearing alone). The image sets them too.
MALLOC_TUNABLES = (("glibc.malloc.hugetlb", "1"), ("glibc.malloc.mmap_threshold", str(32 << 20)),
                   ("glibc.malloc.trim_threshold", str(64 << 20)))


def with_malloc_tunables(env: dict[str, str]) -> dict[str, str]:
    """env with each of MALLOC_TUNABLES added to GLIBC_TUNABLES, unless it sets that one already."""
    current = env.get("GLIBC_TUNABLES", "")
    mine = [f"{name}={value}" for name, value in MALLOC_TUNABLES if f"{name}=" not in current]
    if mine:
        env["GLIBC_TUNABLES"] = ":".join([current, *mine] if current else mine)
    return env


def _die_with_runner() -> None:
    """preexec_fn of fedq run's children: the kernel SIGKILLs them the moment fedq run dies.

    A stopped fedq run stops them itself (Processes.stop); this is for one that was killed. A
    Python handler for a gentler signal cannot run while the main thread is inside a C import
    (TensorFlow's takes seconds on a busy machine), and there is nothing to tidy: the run's
    private Redis goes with fedq run (on an external Redis the run's lease lapses, as when any
    aggregator dies, and a worker may take the run up)."""
    die_with_parent(signal.SIGKILL)


class Processes:
    """Child processes of a local run, each logging to its own file, all ended together."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, args: list[str]) -> None:
        with open(self.log_dir / f"{name}.log", "wb") as out:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "fedq", *args], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, env=self.env, preexec_fn=_die_with_runner)

    def failed(self) -> tuple[str, int] | None:
        """(name, exit code) of the first child that exited with an error, if any."""
        for name, p in self.procs.items():
            if p.poll() not in (None, 0):
                return name, p.returncode
        return None

    def tail(self, name: str, lines: int = 15) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))

    def stop(self, grace: float = 2.0) -> None:
        """SIGTERM every child, SIGKILL those still there after grace seconds, and reap them.

        The grace is short: on a stop, the run is marked failed first, so a work horse need not
        release it (one still starting up, importing TensorFlow, would take longer)."""
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        self.wait(grace)
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
        self.wait(5)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def interrupted_by_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt here, once, so that cleanup runs.

    Python's default for SIGTERM and SIGHUP ends the process on the spot, leaving the children to
    their parent-death signal and the private Redis's directory behind. After the first signal
    the others are ignored, so that a second Ctrl-C cannot cut the cleanup short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame: Any) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {sig: signal.signal(sig, interrupt) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def run_local(settings: Settings, spec: RunSpec, out: Path, *, use_env_redis: bool,
              on_round: Callable[[dict[str, Any]], None] = lambda m: None,
              on_event: Callable[[str], None] = lambda s: None,
              on_progress: Callable[[RunStore], None] = lambda s: None,
              client_commands: list[tuple[str, list[str]]] | None = None,
              stragglers: tuple[int, float] = (0, 0.0)) -> dict[str, Any]:
    """Run a federation with an aggregator and spec.clients client processes; returns the report.

    client_commands (name, fedq arguments) replaces the default of one `fedq client` per shard
    (fedq simulate runs many lightweight clients per process instead). stragglers (M, seconds):
    the last M default clients add that delay to every local training.

    on_progress is called with the run's store at every wake-up (at least every block_seconds)."""
    spec.validate()
    check_data(spec)
    out.mkdir(parents=True, exist_ok=True)
    clear_outputs(out)  # a run that fails before its report must not leave a previous run's files
    with contextlib.ExitStack() as stack:
        stack.enter_context(interrupted_by_signals())
        if not use_env_redis:
            server = stack.enter_context(LocalRedis())
            settings = settings.with_(redis_url=server.url)
            on_event(f"started a private Redis-compatible server ({Path(server.binary).name}) on a unix socket")
        r = connect(settings)
        queue = f"fedq-local-{spec.run_id}"  # a private queue: other runs in a shared Redis are not ours
        submit_run(r, settings, spec, queue=queue)
        env = with_malloc_tunables(dict(os.environ, FEDQ_REDIS_URL=settings.redis_url, PYTHONUNBUFFERED="1",
                                        FEDQ_LOG_LEVEL=settings.log_level))
        # N training processes share this machine's cores: give each its share, not all of them.
        env.setdefault("FEDQ_TF_THREADS", str(settings.tf_threads or max(1, (os.cpu_count() or 1) // spec.clients)))
        procs = Processes(out / "logs", env)
        stack.callback(procs.stop)
        procs.start("aggregator", ["aggregator", "--queue", queue, "--burst"])
        commands = client_commands or [(f"client-{k}", ["client", "--shard", str(k), "--run", spec.run_id, "--once",
                                                        *straggling(k, spec.clients, stragglers)])
                                       for k in range(spec.clients)]
        for name, args in commands:
            procs.start(name, args)
        on_event(f"run {spec.run_id}: aggregator and {spec.clients} clients started (logs in {out / 'logs'})")
        store = RunStore(r, spec.run_id)
        try:
            _follow(store, procs, settings, on_round, on_progress)
        except KeyboardInterrupt:
            # In a shared Redis the run must not look like one whose driver died (a worker would
            # take it over, and wait for clients that are gone).
            with contextlib.suppress(redis.RedisError):
                store.fail("interrupted: fedq run was stopped")
            raise
        procs.wait(30)
        return write_report(store, out)
    raise AssertionError("unreachable")  # pragma: no cover


def straggling(shard: int, clients: int, stragglers: tuple[int, float]) -> list[str]:
    """The client's --delay when it is one of the last M of the clients (stragglers = (M, seconds))."""
    count, delay = stragglers
    return ["--delay", repr(delay)] if count and shard >= clients - count else []


def _follow(store: RunStore, procs: Processes, settings: Settings,
            on_round: Callable[[dict[str, Any]], None],
            on_progress: Callable[[RunStore], None] = lambda s: None) -> None:
    """Block on the run's event stream, reporting rounds, until it ends or a process dies."""
    last, shown = "0-0", 0
    while True:
        on_progress(store)
        last, _ = store.wait_event(last, settings.block_seconds)
        for m in store.metrics()[shown:]:
            on_round(m)
            shown += 1
        state = store.state()
        if state.get("status") in ENDED:
            return
        dead = procs.failed()
        if dead is not None:
            name, code = dead
            reason = f"{name} exited with code {code}"
            store.fail(reason)
            raise FedqError(f"{reason}; last lines of its log:\n{procs.tail(name)}")
