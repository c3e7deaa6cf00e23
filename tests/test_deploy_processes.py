"""Pods as processes: the rendered Kubernetes workloads and the compose services, started locally.

Each container's command, args and environment (ConfigMap, Secret, $(VAR) expansion, the image's
ENTRYPOINT and ENV from workers/Dockerfile) are resolved as the kubelet or compose would, and
started as a local process. Redis is started from the Redis container's own arguments (password,
append-only file); the Redis Service's host:port is mapped to it, volumes to local directories,
each Indexed Job pod gets its JOB_COMPLETION_INDEX, and the dashboard listens on loopback. The
federation must complete with a final model: this is what shows that the manifests are not dead
text. The run's size comes from the descriptors themselves (the dev overlay: 2 clients, 2 rounds
of 1 epoch); only the sites overlay and compose are made smaller, the way an overlay or an .env
file would.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import deploy_checks
import numpy as np
import pytest
from deploy_harness import (
    DEPLOY,
    KUBECTL,
    REDIS_IMAGE,
    LocalRedis,
    Proc,
    compose_argv,
    compose_env,
    compose_project,
    compose_secret_mounts,
    container_argv,
    container_env,
    free_port,
    is_fedq_service,
    kustomize,
    make_pki,
    map_hosts,
    mount_sources,
    read_image,
    render_secure_overlay,
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

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (it renders the overlays)")]
RUN_TIMEOUT = 240


def _loopback_listen(argv: list[str]) -> tuple[list[str], int | None]:
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


def _services_of(docs: list[dict[str, Any]], workload: dict[str, Any]) -> list[tuple[str, int]]:
    labels = deploy_checks.pod_labels(workload)
    return [(s["metadata"]["name"], p["port"]) for s in docs if s["kind"] == "Service"
            and all(labels.get(k) == v for k, v in s["spec"]["selector"].items()) for p in s["spec"]["ports"]]


def _pods_as_processes(docs: list[dict[str, Any]], tmp: Path, claims: dict[str, Path] | None = None,
                       overrides: dict[str, str] | None = None) -> tuple[LocalRedis, list[Proc], dict[str, int]]:
    """Redis from the StatefulSet, and one Proc per container of every other workload's pods."""
    image = read_image()
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
    hosts = {svc: f"127.0.0.1:{redis.port}" for svc in _services_of(docs, redis_sts)}

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
                argv, port = _loopback_listen([rewrite_paths(map_hosts(a, hosts), mounts) for a in argv])
                name = f"{d['metadata']['name']}-{i}-{c['name']}"
                if port is not None and any(p.get("containerPort") for p in c.get("ports", [])):
                    probes[name] = port
                procs.append(Proc(name, argv, env, one_shot=d["kind"] == "Job"))
    return redis, procs, probes


def _assert_final_model(redis: LocalRedis, run_id: str, state: dict[str, str], clients: list[str]) -> float:
    assert state["status"] == "finished", state
    store = RunStore(redis.client(), run_id)
    rounds = store.metrics()
    assert [m["round"] for m in rounds] == list(range(1, int(state["rounds"]) + 1))
    assert all(sorted(m["clients"]) == sorted(clients) for m in rounds), rounds
    g_round, _, tensors = messages.decode_global(store.global_payload(), run_id)
    assert g_round == int(state["rounds"]) and tensors and all(np.isfinite(t).all() for t in tensors)
    final = json.loads(state["final"])
    assert 0.5 < final["test_accuracy"] <= 1.0, final
    return final["test_accuracy"]


def _probe(port: int) -> None:
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


def _run(redis: LocalRedis, procs: list[Proc], probes: dict[str, int], run_id: str, tmp: Path,
         clients: list[str], check: Callable[[RunStore], None] | None = None) -> float:
    redis.start()
    try:
        start(procs, tmp / "logs", tmpdir(tmp, "cwd"))
        state = wait_for_run(procs, redis.client(), run_id, RUN_TIMEOUT)
        wait_one_shots(procs, 60)
        for port in probes.values():
            _probe(port)
        wait_for_run(procs, redis.client(), run_id, 1)  # long-running ones are still up
        accuracy = _assert_final_model(redis, run_id, state, clients)
        if check is not None:
            check(RunStore(redis.client(), run_id))
    finally:
        stop(procs)
        redis.stop()
    # Redis ran with the descriptor's own persistence: an append-only file in its volume.
    assert any(p.name.startswith("appendonly") for p in redis.data_dir.rglob("*")), "no append-only file"
    return accuracy


def test_dev_overlay_pods_run_a_federation(tmp_path: Path) -> None:
    docs = kustomize(DEPLOY / "overlays" / "dev")
    redis, procs, probes = _pods_as_processes(docs, tmp_path)
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    roles = sorted(p.argv[1] for p in procs)
    assert roles == ["aggregator", "client", "client", "dashboard", "submit"]
    _run(redis, procs, probes, config["FEDQ_RUN_ID"], tmp_path, ["client-0", "client-1"])


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make the overlay's CA")
def test_secure_overlay_pods_run_a_federation_each_as_its_own_user_over_tls(tmp_path: Path) -> None:
    """deploy/overlays/secure with its secrets made as its README says: Redis with the ACL file and
    TLS only, every pod connecting as its role's user with its mounted password and certificate."""
    from urllib.parse import unquote, urlsplit

    from fedq.protocol.store import tls_options
    from fedq.settings import Settings

    docs, _ = render_secure_overlay(tmp_path, make_pki(tmp_path / "pki"))
    redis, procs, probes = _pods_as_processes(docs, tmp_path, overrides={"FEDQ_ROUNDS": "1", "FEDQ_LOCAL_EPOCHS": "1"})
    users = {p.name: p.env["FEDQ_REDIS_USERNAME"] for p in procs}
    assert sorted(users.values()) == ["client-0", "client-1", "fedq-aggregator", "fedq-aggregator", "fedq-dashboard"]
    assert all(p.env["FEDQ_REDIS_URL"].startswith("rediss://") and "@" not in p.env["FEDQ_REDIS_URL"] for p in procs)
    # The test reads the run as the aggregator's pod would connect.
    settings = Settings.from_env(env=next(p.env for p in procs if p.argv[1] == "aggregator"))
    url = urlsplit(settings.redis_url)
    redis.client_kwargs = {"username": unquote(url.username or ""), "password": unquote(url.password or ""),
                           "ssl": True, **tls_options(settings)}
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    _run(redis, procs, probes, config["FEDQ_RUN_ID"], tmp_path, ["client-0", "client-1"])


def _site_data(tmp: Path, parts: int) -> list[Path]:
    """Each site's own train.csv: a disjoint part of the built-in data's training rows, of
    unequal sizes (site k holds k + 1 shares), so that a site counted with another's rows shows."""
    from fedq.learning.data import DataSpec, load_dataset, split_indices

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


def test_sites_overlay_pods_train_on_their_own_volumes(tmp_path: Path) -> None:
    docs = kustomize(DEPLOY / "overlays" / "sites")
    site_a, site_b = _site_data(tmp_path, 2)
    claims = {"site-a-data": site_a, "site-b-data": site_b}
    redis, procs, probes = _pods_as_processes(docs, tmp_path, claims,
                                              overrides={"FEDQ_ROUNDS": "1", "FEDQ_LOCAL_EPOCHS": "1"})
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    _run(redis, procs, probes, config["FEDQ_RUN_ID"], tmp_path, ["site-a", "site-b"],
         check=lambda store: _each_site_trained_on_its_own_rows(store, {"site-a": site_a, "site-b": site_b}))


def _each_site_trained_on_its_own_rows(store: RunStore, sites: dict[str, Path]) -> None:
    """Every update of a site counts the training rows of its own train.csv (its file's rows less
    the test split its client holds out: --csv with the default --test-fraction and seed 0),
    and the site joined with that many rows."""
    from fedq.learning.data import DataSpec, split_indices

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


def test_compose_services_run_a_federation(tmp_path: Path) -> None:
    image = read_image()
    variables = {"FEDQ_ROUNDS": "1", "FEDQ_LOCAL_EPOCHS": "1"}  # as an .env file beside it would
    project = compose_project(variables)
    # `docker compose up` starts no service of a profile (Prometheus: --profile metrics).
    services = {n: s for n, s in project["services"].items() if not s.get("profiles")}
    volumes: dict[str, Path] = {}

    def mounts_of(name: str, svc: dict[str, Any]) -> dict[str, Path]:
        out: dict[str, Path] = dict(compose_secret_mounts(svc, project))
        out.update({t: tmpdir(tmp_path, f"{name}-tmpfs") for t in svc.get("tmpfs", [])})
        for v in svc.get("volumes", []):
            source, target = v.split(":")[:2]
            volumes.setdefault(source, tmpdir(tmp_path, f"volume-{source.strip('./') or 'root'}"))
            out[target] = volumes[source]
        return out

    redis_svc = services["redis"]
    data_mounts = mounts_of("redis", redis_svc)
    redis = LocalRedis([rewrite_paths(a, data_mounts) for a in compose_argv(redis_svc, REDIS_IMAGE)],
                       data_mounts["/data"])
    hosts = {("redis", 6379): f"127.0.0.1:{redis.port}"}
    procs, probes = [], {}
    for name, svc in services.items():
        if not is_fedq_service(svc):
            assert name == "redis", f"a service the harness does not know: {name}"
            continue
        mounts = mounts_of(name, svc)
        env = {k: rewrite_paths(map_hosts(v, hosts), mounts) for k, v in {**image.env, **compose_env(svc)}.items()}
        argv, port = _loopback_listen([rewrite_paths(map_hosts(a, hosts), mounts) for a in compose_argv(svc, image)])
        if port is not None:
            probes[name] = port
        one_shot = argv[1] == "submit" or "--once" in argv
        procs.append(Proc(name, argv, env, one_shot=one_shot))
    assert sorted(p.argv[1] for p in procs) == ["aggregator", "client", "client", "dashboard", "submit"]
    run_id = next(p.argv[p.argv.index("--run-id") + 1] for p in procs if p.argv[1] == "submit")
    _run(redis, procs, probes, run_id, tmp_path, ["client-0", "client-1"])
