"""Pods as processes: the helpers of test_deploy_processes.py and test_deploy_sites.py.

Each container's command, args and environment (ConfigMap, Secret, $(VAR) expansion, the image's
ENTRYPOINT and ENV from workers/Dockerfile) are resolved as the kubelet would, and started as a
local process; Redis from its StatefulSet's own arguments, its Services' host:port mapped to it.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import deploy_checks
import numpy as np
from deploy_harness import (
    REDIS_IMAGE,
    LocalRedis,
    Proc,
    container_argv,
    container_env,
    free_port,
    map_hosts,
    mount_sources,
    read_image,
    rewrite_paths,
    secret_volume,
    start,
    stop,
    tmpdir,
    wait_for_run,
    wait_one_shots,
)

from fedq.protocol import messages
from fedq.protocol.store import RunStore

RUN_TIMEOUT = 240


def loopback_listen(argv: list[str]) -> tuple[list[str], int | None]:
    """A server's --host 0.0.0.0 as 127.0.0.1 and its --port as a free one (tests use loopback only)."""
    argv = list(argv)
    port = None
    for i, a in enumerate(argv[:-1]):
        if a == "--host":
            argv[i + 1] = "127.0.0.1"
        if a == "--port":
            port = free_port()
            argv[i + 1] = str(port)
        if a == "--metrics-port":
            argv[i + 1] = str(free_port())
    return argv, port


def services_of(docs: list[dict[str, Any]], workload: dict[str, Any]) -> list[tuple[str, int]]:
    labels = deploy_checks.pod_labels(workload)
    return [(s["metadata"]["name"], p["port"]) for s in docs if s["kind"] == "Service"
            and all(labels.get(k) == v for k, v in s["spec"]["selector"].items()) for p in s["spec"]["ports"]]


def pods_as_processes(docs: list[dict[str, Any]], tmp: Path, claims: dict[str, Path] | None = None,
                       overrides: dict[str, str] | None = None) -> tuple[LocalRedis, list[Proc], dict[str, int]]:
    """Redis from the StatefulSet, and one Proc per container of every other workload's pods."""
    redis_sts = next(d for d in docs if d["kind"] == "StatefulSet")
    c = redis_sts["spec"]["template"]["spec"]["containers"][0]
    env = container_env(c, docs)
    data = tmpdir(tmp, "redis-data")
    volumes = {t["metadata"]["name"]: data for t in redis_sts["spec"]["volumeClaimTemplates"]}
    for v in redis_sts["spec"]["template"]["spec"].get("volumes", []):
        assert "secret" in v, f"a Redis volume the harness does not know: {v}"
        volumes[v["name"]] = secret_volume(v, docs, tmpdir(tmp, f"redis-{v['name']}"))
    mounts = mount_sources(c, volumes, env)
    redis = LocalRedis([rewrite_paths(a, mounts) for a in container_argv(c, REDIS_IMAGE, env)], data)
    hosts = {svc: f"127.0.0.1:{redis.port}" for svc in services_of(docs, redis_sts)}
    return (redis, *workload_procs(docs, tmp, hosts, claims, overrides))


def workload_procs(docs: list[dict[str, Any]], tmp: Path, hosts: dict[tuple[str, int], str],
                   claims: dict[str, Path] | None = None, overrides: dict[str, str] | None = None,
                   ) -> tuple[list[Proc], dict[str, int]]:
    """One Proc per container of every Deployment's and Job's pods (Services at hosts, claims at
    local folders), and the local ports of those that listen."""
    image = read_image()
    procs: list[Proc] = []
    probes: dict[str, int] = {}
    for d in docs:
        if d["kind"] not in ("Deployment", "Job"):
            continue
        indexed = d["kind"] == "Job" and d["spec"].get("completionMode") == "Indexed"
        pods = d["spec"].get("replicas", 1) if d["kind"] == "Deployment" else d["spec"].get("completions", 1)
        assert d["kind"] != "Job" or d["spec"].get("parallelism", 1) == pods, "all of a Job's pods run at once"
        spec = d["spec"]["template"]["spec"]
        for i in range(pods):
            volumes: dict[str, Path] = {}
            for v in spec.get("volumes", []):
                if "emptyDir" in v:
                    volumes[v["name"]] = tmpdir(tmp, f"{d['metadata']['name']}-{i}-{v['name']}")
                elif "persistentVolumeClaim" in v:
                    volumes[v["name"]] = (claims or {})[v["persistentVolumeClaim"]["claimName"]]
                elif "secret" in v:
                    volumes[v["name"]] = secret_volume(v, docs, tmpdir(tmp, f"{d['metadata']['name']}-{i}-{v['name']}"))
                else:
                    raise AssertionError(f"{deploy_checks.kn(d)}: a volume the harness does not know: {v}")
            for c in spec["containers"]:
                assert deploy_checks.is_fedq_image(c["image"]), f"{deploy_checks.kn(d)} runs {c['image']}"
                env = container_env(c, docs, {"JOB_COMPLETION_INDEX": str(i)} if indexed else {}, overrides)
                mounts = mount_sources(c, volumes, env)
                argv = container_argv(c, image, env)
                env = {**image.env, **env}  # the image's ENV, then the container's
                env = {k: rewrite_paths(map_hosts(v, hosts), mounts) for k, v in env.items()}
                if "FEDQ_METRICS_PORT" in env:  # on loopback and a free port, as loopback_listen does for flags
                    env.update(FEDQ_METRICS_PORT=str(free_port()), FEDQ_METRICS_HOST="127.0.0.1")
                argv, port = loopback_listen([rewrite_paths(map_hosts(a, hosts), mounts) for a in argv])
                name = f"{d['metadata']['name']}-{i}-{c['name']}"
                if port is not None and any(p.get("containerPort") for p in c.get("ports", [])):
                    probes[name] = port
                procs.append(Proc(name, argv, env, one_shot=d["kind"] == "Job"))
    return procs, probes


def assert_final_model(redis: LocalRedis, run_id: str, state: dict[str, str], clients: list[str], *,
                       trained: bool = True) -> float:
    """The run finished every round with every client and a finite final model, evaluated; one
    that trained (not support.fake_client's clients) beats chance on the built-in data."""
    assert state["status"] == "finished", state
    store = RunStore(redis.client(), run_id)
    rounds = store.metrics()
    assert [m["round"] for m in rounds] == list(range(1, int(state["rounds"]) + 1))
    assert all(sorted(m["clients"]) == sorted(clients) for m in rounds), rounds
    g_round, _, tensors = messages.decode_global(store.global_payload(), run_id)
    assert g_round == int(state["rounds"]) and tensors and all(np.isfinite(t).all() for t in tensors)
    final = json.loads(state["final"])
    assert (0.5 if trained else 0.0) < final["test_accuracy"] <= 1.0, final
    return final["test_accuracy"]


def probe(port: int) -> None:
    """A tcpSocket readiness probe."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.5)


def run_pods(redis: LocalRedis, procs: list[Proc], probes: dict[str, int], run_id: str, tmp: Path,
         clients: list[str], check: Callable[[RunStore], None] | None = None, *, trained: bool = True) -> float:
    """Run the pods until the run ends and check it (assert_final_model, then check); trained=False
    for clients that train nothing (support.fake_client)."""
    redis.start()
    try:
        start(procs, tmp / "logs", tmpdir(tmp, "cwd"))
        state = wait_for_run(procs, redis.client(), run_id, RUN_TIMEOUT)
        wait_one_shots(procs, 60)
        for port in probes.values():
            probe(port)
        wait_for_run(procs, redis.client(), run_id, 1)  # long-running ones are still up
        accuracy = assert_final_model(redis, run_id, state, clients, trained=trained)
        if check is not None:
            check(RunStore(redis.client(), run_id))
    finally:
        stop(procs)
        redis.stop()
    # Redis ran with the descriptor's own persistence: an append-only file in its volume.
    assert any(p.name.startswith("appendonly") for p in redis.data_dir.rglob("*")), "no append-only file"
    return accuracy


def site_data(tmp: Path, parts: int) -> list[Path]:
    """Each site's own train.csv: a disjoint part of the built-in data's training rows, of
    unequal sizes (site k holds k + 1 shares), so that a site counted with another's rows shows."""
    from fedq.learning.data import load_dataset, split_indices
    from fedq.learning.dataspec import DataSpec

    spec = DataSpec()
    ds = load_dataset(spec)
    train, _ = split_indices(ds.y, spec.test_fraction, spec.seed)
    dirs = []
    cuts = [len(train) * sum(range(1, k + 2)) // sum(range(1, parts + 1)) for k in range(parts - 1)]
    for k, idx in enumerate(np.split(train, cuts)):
        d = tmpdir(tmp, f"site-{k}")
        header = ",".join([*[f"f{j}" for j in range(ds.num_features)], "label"])
        rows = [",".join([*(repr(float(v)) for v in ds.x[i]), str(int(ds.y[i]))]) for i in idx]
        (d / "train.csv").write_text("\n".join([header, *rows]) + "\n")
        dirs.append(d)
    return dirs


def each_site_trained_on_its_own_rows(store: RunStore, sites: dict[str, Path]) -> None:
    """Every update of a site counts the training rows of its own train.csv (its file's rows less
    the test split its client holds out: --csv with the default --test-fraction and seed 0),
    and the site joined with that many rows."""
    from fedq.learning.data import split_indices
    from fedq.learning.dataspec import DataSpec

    want = {}
    for site, d in sites.items():
        labels = np.array([int(line.rsplit(",", 1)[1]) for line in (d / "train.csv").read_text().splitlines()[1:]])
        fit, _ = split_indices(labels, DataSpec().test_fraction, 0)
        want[site] = len(fit)
    assert len(set(want.values())) == len(want), f"sites of equal size prove nothing: {want}"
    assert {cid: rec["rows"] for cid, rec in store.clients().items()} == want
    for m in store.metrics():
        assert {cid: c["num_examples"] for cid, c in m["clients"].items()} == want, m["clients"]
        assert m["num_examples"] == sum(want.values())
