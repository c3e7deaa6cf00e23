"""Pods as processes: the rendered Kubernetes workloads and the compose services, started locally.

Each container's command, args and environment (ConfigMap, Secret, $(VAR) expansion, the image's
ENTRYPOINT and ENV from workers/Dockerfile) are resolved as the kubelet or compose would, and
started as a local process. Redis is started from the Redis container's own arguments (password,
append-only file); the Redis Service's host:port is mapped to it, volumes to local directories,
each Indexed Job pod gets its JOB_COMPLETION_INDEX, and the dashboard listens on loopback. The
federation must complete with a final model: this is what shows that the manifests are not dead
text. The run's size comes from the descriptors themselves (the dev overlay: 2 clients, 2 rounds
of 1 epoch); only the secure and sites overlays and compose are made smaller, the way an overlay
or an .env file would. The dev overlay's clients train with Keras; in the other three, which
differ from it in how pods reach Redis and their data rather than in learning, each client
container's command runs as ``support.fake_client`` (the same `fedq client` with its arguments
and environment, training with FakeTrainer: no TensorFlow in the process), and the final model
is checked evaluated rather than better than chance.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

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
    is_fedq_service,
    kustomize,
    make_pki,
    map_hosts,
    read_image,
    render_secure_overlay,
    rewrite_paths,
    tmpdir,
)
from deploy_pods import each_site_trained_on_its_own_rows, loopback_listen, pods_as_processes, run_pods, site_data
from support.fake_client import fake_client_cmd, fake_client_env

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (it renders the overlays)")]


def _fake_training(procs: list[Proc]) -> list[Proc]:
    """procs with each `fedq client` container run as support.fake_client (FakeTrainer for Keras)."""
    for p in procs:
        if p.argv[1] == "client":
            assert Path(p.argv[0]).name == "fedq", p.argv
            p.argv, p.env = fake_client_cmd(*p.argv[1:]), fake_client_env(p.env)
    return procs


def test_dev_overlay_pods_run_a_federation(tmp_path: Path) -> None:
    docs = kustomize(DEPLOY / "overlays" / "dev")
    redis, procs, probes = pods_as_processes(docs, tmp_path)
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    roles = sorted(p.argv[1] for p in procs)
    assert roles == ["aggregator", "client", "client", "dashboard", "submit"]
    run_pods(redis, procs, probes, config["FEDQ_RUN_ID"], tmp_path, ["client-0", "client-1"])


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make the overlay's CA")
def test_secure_overlay_pods_run_a_federation_each_as_its_own_user_over_tls(tmp_path: Path) -> None:
    """deploy/overlays/secure with its secrets made as its README says: Redis with the ACL file and
    TLS only, every pod connecting as its role's user with its mounted password and certificate."""
    from urllib.parse import unquote, urlsplit

    from fedq.protocol.connection import tls_options
    from fedq.settings import Settings

    docs, _ = render_secure_overlay(tmp_path, make_pki(tmp_path / "pki"))
    redis, procs, probes = pods_as_processes(docs, tmp_path, overrides={"FEDQ_ROUNDS": "1", "FEDQ_LOCAL_EPOCHS": "1"})
    _fake_training(procs)
    users = {p.name: p.env["FEDQ_REDIS_USERNAME"] for p in procs}
    assert sorted(users.values()) == ["client-0", "client-1", "fedq-aggregator", "fedq-aggregator", "fedq-dashboard"]
    assert all(p.env["FEDQ_REDIS_URL"].startswith("rediss://") and "@" not in p.env["FEDQ_REDIS_URL"] for p in procs)
    # The test reads the run as the aggregator's pod would connect.
    settings = Settings.from_env(env=next(p.env for p in procs if p.argv[1] == "aggregator"))
    url = urlsplit(settings.redis_url)
    redis.client_kwargs = {"username": unquote(url.username or ""), "password": unquote(url.password or ""),
                           "ssl": True, **tls_options(settings)}
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    run_pods(redis, procs, probes, config["FEDQ_RUN_ID"], tmp_path, ["client-0", "client-1"], trained=False)


def test_sites_overlay_pods_train_on_their_own_volumes(tmp_path: Path) -> None:
    docs = kustomize(DEPLOY / "overlays" / "sites")
    site_a, site_b = site_data(tmp_path, 2)
    claims = {"site-a-data": site_a, "site-b-data": site_b}
    redis, procs, probes = pods_as_processes(docs, tmp_path, claims,
                                              overrides={"FEDQ_ROUNDS": "1", "FEDQ_LOCAL_EPOCHS": "1"})
    _fake_training(procs)
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    run_pods(redis, procs, probes, config["FEDQ_RUN_ID"], tmp_path, ["site-a", "site-b"],
         check=lambda store: each_site_trained_on_its_own_rows(store, {"site-a": site_a, "site-b": site_b}),
         trained=False)


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
        argv, port = loopback_listen([rewrite_paths(map_hosts(a, hosts), mounts) for a in compose_argv(svc, image)])
        if port is not None:
            probes[name] = port
        one_shot = argv[1] == "submit" or "--once" in argv
        procs.append(Proc(name, argv, env, one_shot=one_shot))
    assert sorted(p.argv[1] for p in procs) == ["aggregator", "client", "client", "dashboard", "submit"]
    _fake_training(procs)
    run_id = next(p.argv[p.argv.index("--run-id") + 1] for p in procs if p.argv[1] == "submit")
    run_pods(redis, procs, probes, run_id, tmp_path, ["client-0", "client-1"], trained=False)
