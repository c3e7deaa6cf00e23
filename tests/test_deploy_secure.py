"""ACL users per role and TLS in deployments, offline: `fedq k8s manifest --acl-passwords FILE
--tls-secret NAME`, deploy/overlays/secure and docker-compose.secure.yml.

Rendered resources are validated (kubernetes-validate, our own checks, the Kubernetes client's
models), searched for plaintext passwords, and cross-checked (every file a command or setting names
is mounted, from a Secret key that exists, for every client index). Then they are run: a real
redis-server started the way the rendered Redis container's arguments say (its ACL file, TLS with
a CA made here), probed with the container's own probe command, and connected to as each role with
exactly the environment and mounted files the rendered pod (or compose service) would have.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import deploy_checks
import numpy as np
import pytest
import redis
import yaml
from deploy_harness import (
    COMPOSE_FILE,
    COMPOSE_SECURE_FILE,
    DEPLOY,
    KUBECTL,
    REDIS_IMAGE,
    LocalRedis,
    cli_env,
    compose_argv,
    compose_env,
    compose_project,
    compose_secret_mounts,
    container_argv,
    container_env,
    fedq_cmd,
    is_fedq_service,
    local_redis_cli,
    make_pki,
    map_hosts,
    mount_sources,
    parse_fedq,
    read_image,
    render_secure_overlay,
    rewrite_paths,
    run_shell,
    secret_volume,
    tmpdir,
)
from redis.backoff import NoBackoff
from redis.retry import Retry

from fedq.errors import ConfigError
from fedq.learning.spec import RunSpec
from fedq.ops import acl, k8s_federation, k8s_overlays
from fedq.ops.k8s_apply import redis_cli_command, to_model
from fedq.ops.k8s_federation import Federation
from fedq.ops.k8s_manifests import build
from fedq.protocol import messages
from fedq.protocol.connection import connect
from fedq.protocol.keys import RunKeys
from fedq.protocol.store import RunStore
from fedq.settings import Settings

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("redis-cli") is None,
                                reason="openssl (certificates) and redis-cli (the probes) are needed")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (it renders the overlay)")
NOPERM = (redis.exceptions.NoPermissionError, redis.exceptions.ResponseError)
NO_RETRY = Retry(NoBackoff(), 0)  # connections expected to fail, at once
TLS_SECRET = "fedq-redis-tls"
# The secure variants, and the plain one (deploy/base's password Secret) they must leave working.
VARIANTS = {"acl+tls": {"acl": True, "tls": True}, "acl": {"acl": True, "tls": False},
            "tls": {"acl": False, "tls": True}, "plain": {"acl": False, "tls": False}}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def acl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("acl") / "fedq-acl"
    done = subprocess.run(fedq_cmd("acl", "--clients", "2", "--out", str(out)), env=cli_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def passwords(acl_dir: Path) -> dict[str, str]:
    return acl.parse_passwords((acl_dir / acl.PASSWORDS_FILE).read_text())


def _tls_secret(pki: Path, namespace: str | None = "fl") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": TLS_SECRET}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "kubernetes.io/tls",
            "data": {k: base64.b64encode((pki / k).read_bytes()).decode() for k in k8s_federation.TLS_KEYS}}


def _render(variant: str, passwords: dict[str, str], pki: Path, clients: int = 2) -> list[dict[str, Any]]:
    """The manifest's resources, plus the TLS Secret that --tls-secret expects to exist."""
    v = VARIANTS[variant]
    fed = Federation(clients=clients, namespace="fl", run_id="secure-run", acl=v["acl"],
                     acl_passwords=passwords if v["acl"] else None, tls_secret=TLS_SECRET if v["tls"] else None,
                     redis_password=None if v["acl"] else "plain-pass-123", dashboard_token="secure-dashboard-token")
    docs = build(fed)
    return docs + [_tls_secret(pki)] if v["tls"] else docs


def _pod(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)["spec"]["template"]["spec"]


# --- rendered ------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_secure_manifests_validate_and_pass_our_checks(variant: str, passwords: dict[str, str], pki: Path) -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    docs = _render(variant, passwords, pki)
    assert deploy_checks.problems(docs) == []
    for doc in docs:
        for version in ("1.32", latest_version()):
            kubernetes_validate.validate(doc, version, strict=True)
        to_model(doc)


def test_acl_manifest_has_digests_not_passwords(passwords: dict[str, str], pki: Path) -> None:
    docs = _render("acl+tls", passwords, pki)
    text = k8s_overlays.to_yaml(docs)
    for user, password in passwords.items():
        assert password not in text, f"{user}'s password is in the manifest as plain text"
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    acl_file = base64.b64decode(secrets[k8s_federation.ACL_SECRET]["data"]["users.acl"]).decode()
    for user, password in passwords.items():
        line = next(ln for ln in acl_file.splitlines() if ln.split()[1] == user)
        assert f"#{hashlib.sha256(password.encode()).hexdigest()}" in line.split()
        assert password not in acl_file and f">{password}" not in line
    assert acl_file.splitlines()[0] == acl.default_user_off()
    users = {k: base64.b64decode(v).decode() for k, v in secrets[k8s_federation.USERS_SECRET]["data"].items()}
    assert users == passwords  # the one place passwords are (base64 in a Secret, as Kubernetes keeps them)
    # No pod has a password in its environment or arguments: only a Secret reference or a file.
    for d in docs:
        spec = deploy_checks.pod_spec(d)
        for c in (spec or {}).get("containers", []):
            assert not any("value" in e and any(p in e["value"] for p in passwords.values()) for e in c["env"])
            assert "--requirepass" not in c.get("args", [])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_file_a_pod_names_is_mounted_from_a_secret_key(variant: str, passwords: dict[str, str], pki: Path,
                                                             tmp_path: Path) -> None:
    """Materialise each pod's volumes as the kubelet would (for every client index) and resolve every
    absolute path its arguments and FEDQ_* settings name: each must be a file that is there."""
    docs = _render(variant, passwords, pki)
    checked = 0
    for d in docs:
        spec = deploy_checks.pod_spec(d)
        if spec is None:
            continue
        indexed = d["kind"] == "Job" and d["spec"].get("completionMode") == "Indexed"
        for index in range(d["spec"].get("completions", 1) if indexed else 1):
            volumes = {t["metadata"]["name"]: tmpdir(tmp_path, "claim")
                       for t in d["spec"].get("volumeClaimTemplates", [])}
            for v in spec.get("volumes", []):
                volumes[v["name"]] = (secret_volume(v, docs, tmpdir(tmp_path, v["name"])) if "secret" in v
                                      else tmpdir(tmp_path, v["name"]))
            for c in spec["containers"]:
                env = container_env(c, docs, {"JOB_COMPLETION_INDEX": str(index)} if indexed else {})
                mounts = mount_sources(c, volumes, env)
                named = [a for a in container_argv(c, REDIS_IMAGE, env) if a.startswith("/etc/")]
                # Paths a start-up script reads (Redis' password file).
                named += [p for a in container_argv(c, REDIS_IMAGE, env) if "\n" in a
                          for p in re.findall(r"/etc/[\w./-]+", a)]
                named += [v for k, v in env.items() if k.startswith("FEDQ_") and v.startswith("/etc/")]
                for path in named:
                    local = Path(rewrite_paths(path, mounts))
                    assert local != Path(path) and local.is_file(), f"{deploy_checks.kn(d)}: {path} is not mounted"
                    checked += 1
                if env.get("FEDQ_REDIS_USERNAME"):
                    # The mounted password is this user's own.
                    file = Path(rewrite_paths(env["FEDQ_REDIS_PASSWORD_FILE"], mounts))
                    assert file.read_text() == passwords[env["FEDQ_REDIS_USERNAME"]]
    # Redis's ACL (or password) file and TLS files; each fedq pod's password file and TLS files (two
    # client pods), and the dashboard's token file.
    assert checked == {"acl+tls": 4 + 4 * 5 + 1, "acl": 1 + 5 + 1, "tls": 4 + 4 * 5 + 1, "plain": 1 + 5 + 1}[variant]


def test_our_checks_catch_a_client_pod_without_its_password(passwords: dict[str, str], pki: Path) -> None:
    docs = _render("acl", {**passwords, "client-2": "a-third-password"}, pki, clients=3)
    spec = _pod(docs, "Job", "fedq-clients")
    auth = next(v for v in spec["volumes"] if v["name"] == "redis-auth")
    auth["secret"]["items"] = auth["secret"]["items"][:2]  # client-2's key forgotten
    assert any("index [2]" in p for p in deploy_checks.problems(docs))
    docs = _render("acl", passwords, pki)
    spec = _pod(docs, "Deployment", "fedq-aggregator")
    next(v for v in spec["volumes"] if v["name"] == "redis-auth")["secret"]["items"][0]["key"] = "fedq-agregator"
    assert any("lacks" in p for p in deploy_checks.problems(docs))
    docs = _render("acl+tls", passwords, pki)[:-1]  # the TLS Secret missing
    assert any(TLS_SECRET in p for p in deploy_checks.problems(docs))


@pytest.mark.slow
def test_fedq_k8s_manifest_options(acl_dir: Path, passwords: dict[str, str]) -> None:
    file = str(acl_dir / acl.PASSWORDS_FILE)

    def manifest(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(fedq_cmd("k8s", "manifest", "--run-id", "r1", *args), env=cli_env(),
                              capture_output=True, text=True, timeout=120)

    done = manifest("--acl-passwords", file, "--tls-secret", TLS_SECRET, "--namespace", "fl")
    assert done.returncode == 0, done.stderr
    printed = [d for d in yaml.safe_load_all(done.stdout) if d]
    token = base64.b64decode(printed[2]["data"]["token"]).decode()  # a new random one
    expected = build(Federation(namespace="fl", run_id="r1", acl=True, acl_passwords=passwords, tls_secret=TLS_SECRET,
                                dashboard_token=token))
    assert printed == expected
    without = [d for d in yaml.safe_load_all(manifest("--acl-passwords", file, "--no-secret").stdout) if d]
    assert not any(d["kind"] == "Secret" for d in without) and len(without) == len(expected) - 3
    password_file = acl_dir.parent / "redis-password"
    password_file.write_text("abcdefgh1\n")
    for args, message in [(("--acl-passwords", file, "--redis-password-file", str(password_file)),
                           "exclude each other"),
                          (("--acl-passwords", file, "--clients", "3"), "lack client-2"),
                          (("--tls-secret", "Not_A_Name"), "not a valid Kubernetes name")]:
        bad = manifest(*args)
        assert bad.returncode == 1 and message in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr


def test_federation_checks_secure_options(passwords: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="off"):
        Federation(acl_passwords=passwords).validate()
    with pytest.raises(ConfigError, match="white space"):
        Federation(acl=True, acl_passwords={**passwords, "client-1": "two words"}).validate()


# --- deploy/overlays/secure ---------------------------------------------------------------------------
def test_secure_overlay_is_what_fedq_generates() -> None:
    """Regenerate it with `fedq k8s secure-overlay deploy/overlays/secure`."""
    directory = DEPLOY / "overlays" / "secure"
    files = k8s_overlays.secure_overlay_files()
    on_disk = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()
               and p.relative_to(directory).parts[0] != "secrets"}
    assert on_disk == set(files) | {"README.md"}
    for name, text in files.items():
        assert (directory / name).read_text() == text, f"deploy/overlays/secure/{name} differs: regenerate it"


@needs_kubectl
@pytest.mark.slow
def test_secure_overlay_renders_what_fedq_k8s_manifest_prints(tmp_path: Path, pki: Path) -> None:
    import kubernetes_validate

    docs, secrets_dir = render_secure_overlay(tmp_path, pki)
    for doc in docs:
        kubernetes_validate.validate(doc, "1.32", strict=True)
    assert deploy_checks.problems(docs) == []
    file_passwords = acl.parse_passwords((secrets_dir / acl.PASSWORDS_FILE).read_text())
    fed = Federation(namespace=k8s_overlays.SECURE_NAMESPACE, acl=True, acl_passwords=file_passwords,
                     tls_secret=TLS_SECRET, dashboard_token=(secrets_dir / "dashboard-token").read_text().strip())

    def normal(d: dict[str, Any]) -> dict[str, Any]:
        if d["kind"] == "Secret":  # kustomize wraps base64 lines; compare what they hold
            d = {**d, "data": {k: base64.b64decode(v) for k, v in d["data"].items()}}
        return d

    rendered = {(d["kind"], d["metadata"]["name"]): normal(d) for d in docs}
    printed = {(d["kind"], d["metadata"]["name"]): normal(d) for d in build(fed)}
    assert set(rendered) - set(printed) == {("Namespace", k8s_overlays.SECURE_NAMESPACE), ("Secret", TLS_SECRET)}
    for key, doc in printed.items():
        if key == ("Secret", k8s_federation.DASHBOARD_SECRET):  # the file's line, with its newline
            doc = {**doc, "data": {"token": doc["data"]["token"] + b"\n"}}
        assert rendered[key] == doc, f"{key} differs between the overlay and fedq k8s manifest"
    assert rendered[("Secret", TLS_SECRET)]["type"] == "kubernetes.io/tls"


# --- run: Redis as its container says, each role as its pod would connect -----------------------------
def _kwargs(settings: Settings) -> dict[str, Any]:
    """redis.Redis arguments of a fedq process's settings (its URL's user and password, its TLS files)."""
    from fedq.protocol.connection import tls_options

    url = urlsplit(settings.redis_url)
    kw: dict[str, Any] = {"username": unquote(url.username) if url.username else None,
                          "password": unquote(url.password) if url.password else None, **tls_options(settings)}
    if url.scheme == "rediss":
        kw["ssl"] = True
    return kw


class Deployed:
    """A rendered deployment's Redis, running locally, and the settings each pod would have."""

    def __init__(self, docs: list[dict[str, Any]], tmp: Path) -> None:
        self.docs, self.tmp = docs, tmp
        sts = next(d for d in docs if d["kind"] == "StatefulSet")
        spec = sts["spec"]["template"]["spec"]
        self.container = spec["containers"][0]
        self.env = container_env(self.container, docs)
        volumes = {"data": tmpdir(tmp, "redis-data")}
        for v in spec.get("volumes", []):
            volumes[v["name"]] = secret_volume(v, docs, tmpdir(tmp, f"redis-{v['name']}"))
        self.mounts = mount_sources(self.container, volumes, self.env)
        argv = [rewrite_paths(a, self.mounts) for a in container_argv(self.container, REDIS_IMAGE, self.env)]
        self.redis = LocalRedis(argv, volumes["data"])
        self.hosts = {(k8s_federation.REDIS_SERVICE, k8s_federation.REDIS_PORT): f"127.0.0.1:{self.redis.port}"}

    def pod_env(self, kind: str, name: str, index: int | None = None) -> dict[str, str]:
        d = next(d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == name)
        spec = d["spec"]["template"]["spec"]
        c = spec["containers"][0]
        env = container_env(c, self.docs, {"JOB_COMPLETION_INDEX": str(index)} if index is not None else {})
        volumes = {v["name"]: secret_volume(v, self.docs, tmpdir(self.tmp, v["name"])) if "secret" in v
                   else tmpdir(self.tmp, v["name"]) for v in spec["volumes"]}
        mounts = mount_sources(c, volumes, env)
        return {k: rewrite_paths(map_hosts(v, self.hosts), mounts) for k, v in env.items()}

    def settings(self, kind: str, name: str, index: int | None = None) -> Settings:
        return Settings.from_env(env=self.pod_env(kind, name, index), connect_timeout=3.0, socket_timeout=5.0)

    def probe(self, which: str = "readinessProbe", **env: str) -> subprocess.CompletedProcess[str]:
        command = self.container[which]["exec"]["command"]
        assert command[:2] == ["sh", "-c"]
        local = {k: rewrite_paths(v, self.mounts) for k, v in self.env.items()}
        if "REDIS_CLI_ARGS" in local:  # paths inside it, separated by spaces
            local["REDIS_CLI_ARGS"] = " ".join(rewrite_paths(p, self.mounts) for p in local["REDIS_CLI_ARGS"].split())
        return run_shell(local_redis_cli(command[2], self.redis.port), {**local, **env})


@pytest.fixture(params=list(VARIANTS))
def deployed(request: pytest.FixtureRequest, passwords: dict[str, str], pki: Path,
             tmp_path: Path) -> Iterator[Deployed]:
    dep = Deployed(_render(request.param, passwords, pki), tmp_path)
    dep.variant = request.param  # type: ignore[attr-defined]
    dep.redis.client_kwargs = _kwargs(dep.settings("Deployment", "fedq-aggregator"))
    dep.redis.start()
    try:
        yield dep
    finally:
        dep.redis.stop()


def test_rendered_pods_reach_redis_as_their_roles_and_nothing_else(deployed: Deployed,
                                                                   passwords: dict[str, str]) -> None:
    v = VARIANTS[deployed.variant]  # type: ignore[attr-defined]
    agg_settings = deployed.settings("Deployment", "fedq-aggregator")
    assert agg_settings.redis_url.startswith("rediss://" if v["tls"] else "redis://")
    agg = connect(agg_settings)
    store = RunStore(agg, "secure-run")
    store.create(RunSpec(clients=2, rounds=1, run_id="secure-run"))
    k = RunKeys("secure-run")
    # The submit Job is the aggregator's user too.
    assert RunStore(connect(deployed.settings("Job", "fedq-submit")), "secure-run").state()["status"] == "queued"

    clients = [connect(deployed.settings("Job", "fedq-clients", index)) for index in (0, 1)]
    for index, client in enumerate(clients):
        # Each pod is its own client: it joins under its id, and cannot write as the other one.
        own = RunStore(client, "secure-run")
        assert own.join(f"client-{index}", {"shard": index, "rows": 5}, {"count": [5]}) == "requested"
        if v["acl"]:
            with pytest.raises(NOPERM):
                client.hset(k.update(f"client-{1 - index}", 1), "payload", b"forged")
    assert store.acquire_lease("driver", 30)
    weights = [np.zeros((3, 2), np.float32), np.zeros(2, np.float32)]
    assert store.open_training(b"scaler", messages.encode_global("secure-run", 0, ["w", "b"], weights))
    for client in clients:
        assert RunStore(client, "secure-run").global_payload() is not None
        if v["acl"]:
            with pytest.raises(NOPERM):
                client.set(k.global_model, b"forged")
    dash = connect(deployed.settings("Deployment", "fedq-dashboard"))
    assert RunStore(dash, "secure-run").state()["phase"] == "train"
    if v["acl"]:
        with pytest.raises(NOPERM):
            dash.set(k.global_model, b"forged")
        # The passwordless default user is off: the URL without a user gets nowhere.
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(**{**_kwargs(agg_settings), "username": None, "password": None},
                        host="127.0.0.1", port=deployed.redis.port, socket_timeout=5, retry=NO_RETRY).ping()
    assert store.global_payload() == messages.encode_global("secure-run", 0, ["w", "b"], weights)

    if v["tls"]:
        # No plain port: a redis:// connection to Redis's port is refused, and so is TLS without
        # a client certificate of the CA.
        kw = _kwargs(agg_settings)
        with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
            redis.Redis(host="127.0.0.1", port=deployed.redis.port, username=kw["username"], password=kw["password"],
                        socket_timeout=3, socket_connect_timeout=3, retry=NO_RETRY).ping()
        with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
            redis.Redis(**{**kw, "ssl_certfile": None, "ssl_keyfile": None}, host="127.0.0.1",
                        port=deployed.redis.port, socket_timeout=3, retry=NO_RETRY).ping()


def test_the_redis_containers_probes_and_fedq_k8s_status_command_work(deployed: Deployed) -> None:
    for which in ("readinessProbe", "livenessProbe"):
        done = deployed.probe(which)
        assert done.returncode == 0, done.stdout + done.stderr
    assert deployed.probe(REDISCLI_AUTH="wrong-password", REDIS_PASSWORD="wrong-password").returncode != 0
    # `fedq k8s status` reads the run with redis-cli in the Redis container, in every variant.
    RunStore(connect(deployed.settings("Deployment", "fedq-aggregator")), "status-run").create(
        RunSpec(clients=2, rounds=3, run_id="status-run"))
    local = {k: rewrite_paths(v, deployed.mounts) for k, v in deployed.env.items()}
    if "REDIS_CLI_ARGS" in local:
        local["REDIS_CLI_ARGS"] = " ".join(rewrite_paths(p, deployed.mounts) for p in local["REDIS_CLI_ARGS"].split())
    done = run_shell(local_redis_cli(redis_cli_command(f"--raw HGETALL '{RunKeys('status-run').state}'"),
                                     deployed.redis.port), local)
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and dict(zip(lines[0::2], lines[1::2]))["rounds"] == "3", done.stdout + done.stderr


# --- docker compose -f docker-compose.yml -f docker-compose.secure.yml ---------------------------------
EXPECTED_USERS = {"aggregator": acl.AGGREGATOR_USER, "submit": acl.AGGREGATOR_USER, "dashboard": acl.DASHBOARD_USER,
                  "client-0": "client-0", "client-1": "client-1"}


def _secure_project(acl_dir: Path) -> dict[str, Any]:
    return compose_project({"FEDQ_ACL_DIR": str(acl_dir), "FEDQ_ROUNDS": "1"}, (COMPOSE_FILE, COMPOSE_SECURE_FILE))


def test_compose_override_gives_each_service_its_own_user(acl_dir: Path, passwords: dict[str, str]) -> None:
    project = _secure_project(acl_dir)
    services = project["services"]
    redis_cmd = services["redis"]["command"]
    assert "--requirepass" not in redis_cmd and redis_cmd[redis_cmd.index("--aclfile") + 1] == "/run/secrets/redis-acl"
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"  # persistence as in docker-compose.yml
    assert compose_secret_mounts(services["redis"], project)["/run/secrets/redis-acl"] == acl_dir / acl.ACL_FILE
    image = read_image()
    fedq_services = {n: s for n, s in services.items() if is_fedq_service(s)}
    assert set(fedq_services) == set(EXPECTED_USERS)
    for name, svc in fedq_services.items():
        env = compose_env(svc)
        user = EXPECTED_USERS[name]
        assert env["FEDQ_REDIS_USERNAME"] == user
        assert "@" not in env["FEDQ_REDIS_URL"], "no password in the URL"
        secrets = compose_secret_mounts(svc, project)
        own = {k: v for k, v in secrets.items() if k != "/run/secrets/dashboard-token"}
        assert own == {env["FEDQ_REDIS_PASSWORD_FILE"]: acl_dir / f"{user}.password"}, name
        argv = compose_argv(svc, image)
        if argv[1] == "client":
            assert f"client-{argv[argv.index('--shard') + 1]}" == user
        # Every command still parses, with its settings completed from its own password file.
        local = {k: rewrite_paths(v, secrets) for k, v in {**image.env, **env}.items()}
        parse_fedq(argv, local)
        assert Settings.from_env(env=local).redis_url == f"redis://{user}:{passwords[user]}@redis:6379/0"
    # The plain `docker compose up`: one password, from a secret file too.
    plain = compose_project({})["services"]
    assert "requirepass $(cat /run/secrets/redis-password)" in plain["redis"]["command"][2]


@pytest.mark.slow
def test_compose_override_runs_as_it_says(acl_dir: Path, tmp_path: Path) -> None:
    """Redis from the override's command line and secrets, its health check, and each service's
    environment connecting; the submit service's own command creates the run as fedq-aggregator."""
    project = _secure_project(acl_dir)
    services = project["services"]
    red = services["redis"]
    mounts = {**compose_secret_mounts(red, project), "/data": tmpdir(tmp_path, "redis-data")}
    server = LocalRedis([rewrite_paths(a, mounts) for a in compose_argv(red, REDIS_IMAGE)], mounts["/data"])
    hosts = {("redis", 6379): f"127.0.0.1:{server.port}"}
    image = read_image()

    def env_of(name: str) -> dict[str, str]:
        secrets = compose_secret_mounts(services[name], project)
        merged = {**image.env, **compose_env(services[name])}
        return {k: rewrite_paths(map_hosts(v, hosts), secrets) for k, v in merged.items()}

    server.client_kwargs = _kwargs(Settings.from_env(env=env_of("aggregator")))
    server.start()
    try:
        test = red["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL"
        command = local_redis_cli(test[1].replace("$$", "$"), server.port)  # compose's $$ is a literal $
        probe_mounts = compose_secret_mounts(red, project)
        done = run_shell(rewrite_paths_in(command, probe_mounts), {})
        assert done.returncode == 0, done.stdout + done.stderr
        submit = compose_argv(services["submit"], image)
        done = subprocess.run([*fedq_cmd(*submit[1:])], env={**cli_env(), **env_of("submit")}, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        run_id = submit[submit.index("--run-id") + 1]
        dash = connect(Settings.from_env(env=env_of("dashboard")))
        assert RunStore(dash, run_id).state()["status"] == "queued"
        with pytest.raises(NOPERM):
            dash.hset(RunKeys(run_id).state, "status", "failed")
        client = connect(Settings.from_env(env=env_of("client-1")))
        assert RunStore(client, run_id).join("client-1", {"shard": 1, "rows": 5}, {"count": [5]}) == "requested"
        with pytest.raises(NOPERM):
            client.hset(RunKeys(run_id).update("client-0", 1), "payload", b"forged")
        with pytest.raises(NOPERM):
            client.set(RunKeys(run_id).global_model, b"forged")
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=server.port, socket_timeout=5, retry=NO_RETRY).ping()  # no user: the default user is off
    finally:
        server.stop()


def rewrite_paths_in(command: str, mounts: dict[str, Path]) -> str:
    """Container paths inside a shell command, as their local files."""
    for mount, local in mounts.items():
        command = command.replace(mount, str(local))
    return command


COMPOSE_TLS_FILE = COMPOSE_FILE.with_name("docker-compose.tls.yml")


@pytest.mark.slow
def test_compose_tls_override_runs_as_it_says(acl_dir: Path, pki: Path, tmp_path: Path) -> None:
    """docker-compose.tls.yml over the ACL override: Redis serves TLS only and wants client
    certificates, its health check passes over TLS, every service connects as its own user with
    rediss:// and the mounted certificate, and plain or certificate-less connections are refused."""
    files = (COMPOSE_FILE, COMPOSE_SECURE_FILE, COMPOSE_TLS_FILE)
    project = compose_project({"FEDQ_ACL_DIR": str(acl_dir), "FEDQ_TLS_DIR": str(pki), "FEDQ_ROUNDS": "1"}, files)
    services = project["services"]
    red = services["redis"]
    cmd = red["command"]
    assert cmd[cmd.index("--port") + 1] == "0" and cmd[cmd.index("--tls-auth-clients") + 1] == "yes"
    assert cmd[cmd.index("--aclfile") + 1] == "/run/secrets/redis-acl"  # still the ACL users
    mounts = {**compose_secret_mounts(red, project), "/data": tmpdir(tmp_path, "redis-data")}
    assert {"/run/secrets/redis-acl", "/run/secrets/redis-probe-password", "/run/secrets/redis-tls-key"} <= set(mounts)
    server = LocalRedis([rewrite_paths(a, mounts) for a in compose_argv(red, REDIS_IMAGE)], mounts["/data"])
    hosts = {("redis", 6379): f"127.0.0.1:{server.port}"}
    image = read_image()

    def env_of(name: str) -> dict[str, str]:
        secrets = compose_secret_mounts(services[name], project)
        return {k: rewrite_paths(map_hosts(v, hosts), secrets)
                for k, v in {**image.env, **compose_env(services[name])}.items()}

    server.client_kwargs = _kwargs(Settings.from_env(env=env_of("aggregator")))
    server.start()
    try:
        probe = local_redis_cli(red["healthcheck"]["test"][1].replace("$$", "$"), server.port)
        done = run_shell(rewrite_paths_in(probe, compose_secret_mounts(red, project)), {})
        assert done.returncode == 0, done.stdout + done.stderr
        for name in ("aggregator", "submit", "dashboard", "client-0", "client-1"):
            settings = Settings.from_env(env=env_of(name))
            assert settings.redis_url.startswith(f"rediss://{EXPECTED_USERS[name]}:"), name
            assert connect(settings).ping(), name
        client = connect(Settings.from_env(env=env_of("client-1")))
        with pytest.raises(NOPERM):
            client.set(RunKeys("any-run").global_model, b"forged")
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=server.port, socket_timeout=5, retry=NO_RETRY).ping()  # plain TCP: no answer
        no_cert = {k: v for k, v in _kwargs(Settings.from_env(env=env_of("aggregator"))).items()
                   if k not in ("ssl_certfile", "ssl_keyfile")}
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=server.port, socket_timeout=5, retry=NO_RETRY, **no_cert).ping()
    finally:
        server.stop()
