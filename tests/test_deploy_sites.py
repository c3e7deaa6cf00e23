"""A hub and two sites outside it, run as local processes on 127.0.0.1.

The hub is deploy/overlays/hub with its secrets made by `fedq k8s hub-secrets` (as its README
says): Redis started from its StatefulSet's own arguments (TLS only, client certificates required,
the ACL file with one user per site), the aggregator, the submit Job and the dashboard. Site A
runs the Job that `fedq k8s site` prints, site B the service of docker-compose.site.yml; each
with its own certificate, its own Redis user and its own train.csv. The run must finish; then
each site may do only what its user may, and a client without the hub CA's certificate is refused.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import redis
import yaml
from deploy_harness import (
    DEPLOY,
    KUBECTL,
    ROOT,
    Proc,
    cli_env,
    compose_argv,
    compose_env,
    compose_project,
    compose_secret_mounts,
    fedq_cmd,
    kustomize,
    read_image,
    rewrite_paths,
    tmpdir,
)
from deploy_pods import each_site_trained_on_its_own_rows, pods_as_processes, run_pods, site_data, workload_procs
from redis.backoff import NoBackoff
from redis.retry import Retry

from fedq.learning.data import split_indices
from fedq.learning.dataspec import DataSpec
from fedq.ops import pki
from fedq.protocol.keys import RunKeys
from fedq.protocol.store import RunStore

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (it renders the hub overlay)")]
RUN = "hub-run-1"
SITES = ("site-a", "site-b")
NOPERM = (redis.exceptions.NoPermissionError, redis.exceptions.ResponseError)
REFUSED = (redis.exceptions.ConnectionError, redis.exceptions.AuthenticationError, ssl.SSLError, OSError)


def _fedq(*args: str) -> str:
    done = subprocess.run(fedq_cmd(*args), env=cli_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _site_b(hub: str, bundle: Path, data: Path, tmp: Path) -> Proc:
    """docker-compose.site.yml's client, as compose would start it (secrets, /data, a tmpfs /tmp)."""
    image = read_image()
    project = compose_project({"FEDQ_SITE": "site-b", "FEDQ_HUB": hub, "FEDQ_RUN_ID": RUN,
                               "FEDQ_SITE_DIR": str(bundle), "FEDQ_SITE_DATA": str(data)},
                              (ROOT / "docker-compose.site.yml",))
    svc = project["services"]["client"]
    mounts = {**compose_secret_mounts(svc, project), "/tmp": tmpdir(tmp, "site-b-tmp"), "/data": data}
    env = {k: rewrite_paths(v, mounts) for k, v in {**image.env, **compose_env(svc)}.items()}
    return Proc("site-b", [rewrite_paths(a, mounts) for a in compose_argv(svc, image)], env, one_shot=True)


def _tls(port: int, user: str | None, password: str | None, ca: Path, cert: Path | None,
         key: Path | None) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, username=user, password=password, ssl=True,
                       ssl_ca_certs=str(ca), ssl_certfile=str(cert) if cert else None,
                       ssl_keyfile=str(key) if key else None, ssl_cert_reqs="required", socket_timeout=5,
                       retry=Retry(NoBackoff(), 0))


def _refused(conn: redis.Redis) -> None:
    with pytest.raises(REFUSED):
        conn.ping()


def _each_site_may_only_what_its_user_may(port: int, secrets: Path, tmp: Path) -> Callable[[RunStore], None]:
    def check(store: RunStore) -> None:
        k = RunKeys(RUN)
        bundles = {s: secrets / "sites" / s for s in SITES}

        def site(name: str, password: str | None = None) -> redis.Redis:
            b = bundles[name]
            return _tls(port, name, password or (b / "password").read_text(), b / pki.CA_CERT, b / pki.CERT,
                        b / pki.KEY)

        a = site("site-a")
        assert a.hget(k.state, "status") == b"finished" and a.get(k.global_model)  # it reads what all clients read
        a.set(f"{k.client_base('site-a')}:probe", b"1")  # and writes its own keys
        site_b_keys = list(store.r.scan_iter(match=f"{k.client_base('site-b')}:*"))
        assert site_b_keys, "site-b left no keys of its own"
        for key in site_b_keys:
            for command in (("GET", key), ("SET", key, b"x"), ("DEL", key), ("HGETALL", key)):
                with pytest.raises(NOPERM):
                    a.execute_command(*command)
        # No site writes the global model, the run's state or its members, nor commits through a script.
        for attempt in (lambda: a.set(k.global_model, b"x"), lambda: a.hset(k.state, "round", "99"),
                        lambda: a.sadd(k.members, "site-c"),
                        lambda: a.eval("return redis.call('HSET', KEYS[1], 'status', 'finished')", 1, k.state)):
            with pytest.raises(NOPERM):
                attempt()
        assert store.state()["round"] == "2" and store.r.get(f"{k.client_base('site-a')}:probe") == b"1"
        # A site's certificate with another site's password, or no certificate, or one the hub's
        # CA did not sign, or no TLS at all: refused.
        with pytest.raises(redis.exceptions.AuthenticationError):
            site("site-a", (bundles["site-b"] / "password").read_text()).ping()
        ca = bundles["site-a"] / pki.CA_CERT
        password = (bundles["site-a"] / "password").read_text()
        _refused(_tls(port, "site-a", password, ca, None, None))
        stranger = tmp / "stranger"
        pki.write(stranger, pki.issue(pki.make_ca("another-ca"), "site-a"))
        _refused(_tls(port, "site-a", password, ca, stranger / pki.CERT, stranger / pki.KEY))
        _refused(redis.Redis(host="127.0.0.1", port=port, username="site-a", password=password, socket_timeout=5,
                             retry=Retry(NoBackoff(), 0)))
    return check


def _sites_trained_and_validated_on_their_own_rows(store: RunStore, data: dict[str, Path]) -> None:
    """Each site counted its own file's training rows, and validated each global model (from round
    2) on the rows its file holds out: the run's test fraction of them."""
    records = store.clients()
    for site, d in data.items():
        labels = np.array([int(line.rsplit(",", 1)[1]) for line in (d / "train.csv").read_text().splitlines()[1:]])
        _, held = split_indices(labels, DataSpec().test_fraction, 0)
        assert records[site]["val_rows"] == len(held) > 0, records[site]
    last = store.metrics()[-1]["clients"]
    for s in data:
        assert last[s]["eval_examples"] == records[s]["val_rows"] and 0.5 < last[s]["eval_accuracy"] <= 1, last[s]


def test_a_hub_and_two_sites_outside_it_run_a_federation_each_as_its_own_user(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    _fedq("k8s", "hub-secrets", str(secrets), "--site", "site-a", "--site", "site-b", "--hub-host", "127.0.0.1")
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy, ignore=shutil.ignore_patterns("secrets"))
    shutil.copytree(secrets, copy / "overlays" / "hub" / "secrets")
    docs = kustomize(copy / "overlays" / "hub")
    redis_, procs, probes = pods_as_processes(docs, tmp_path, overrides={"FEDQ_ROUNDS": "2", "FEDQ_LOCAL_EPOCHS": "1"})
    assert sorted(p.argv[1] for p in procs) == ["aggregator", "dashboard", "submit"], "no client runs on the hub"
    hub = f"127.0.0.1:{redis_.port}"
    rows = dict(zip(SITES, site_data(tmp_path, 2)))

    kit = [d for d in yaml.safe_load_all(_fedq("k8s", "site", "site-a", "--hub", hub, "--run-id", RUN,
                                               "--bundle", str(secrets / "sites" / "site-a"))) if d]
    claim = next(d["metadata"]["name"] for d in kit if d["kind"] == "PersistentVolumeClaim")
    site_a, _ = workload_procs(kit, tmp_path, {}, {claim: rows["site-a"]})
    procs += [*site_a, _site_b(hub, secrets / "sites" / "site-b", rows["site-b"], tmp_path)]
    users = {p.env.get("FEDQ_REDIS_USERNAME") for p in procs if p.argv[1] == "client"}
    assert users == set(SITES) and all(p.env["FEDQ_REDIS_URL"].startswith("rediss://") for p in procs)

    aggregator = next(p.env for p in procs if p.argv[1] == "aggregator")
    redis_.client_kwargs = _as_aggregator(aggregator)
    check = _each_site_may_only_what_its_user_may(redis_.port, secrets, tmp_path)

    def checks(store: RunStore) -> None:
        check(store)
        each_site_trained_on_its_own_rows(store, rows)
        _sites_trained_and_validated_on_their_own_rows(store, rows)

    run_pods(redis_, procs, probes, RUN, tmp_path, list(SITES), check=checks)


def _as_aggregator(env: dict[str, str]) -> dict[str, Any]:
    """redis.Redis arguments of the aggregator pod's settings (its user, password file and TLS files)."""
    from fedq.protocol.connection import tls_options
    from fedq.settings import Settings

    settings = Settings.from_env(env=env)
    url = urlsplit(settings.redis_url)
    return {"username": unquote(url.username or ""), "password": unquote(url.password or ""), "ssl": True,
            **tls_options(settings)}
