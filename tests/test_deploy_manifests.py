"""deploy/, docker-compose.yml and `fedq k8s manifest`: rendered, validated, cross-checked, parsed.

Nothing here starts a process of fedq's (see test_deploy_processes.py for that); every test is
fast. The kustomize renders need kubectl (with its built-in kustomize); without it those tests
skip, saying so.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import deploy_checks
import pytest
import yaml
from deploy_harness import (
    COMPOSE_FILE,
    DEPLOY,
    KUBECTL,
    OVERLAYS,
    ParseError,
    cli_env,
    compose_argv,
    compose_env,
    compose_project,
    compose_secret_mounts,
    compose_services,
    container_argv,
    container_env,
    fedq_cmd,
    fedq_command_exists,
    is_fedq_service,
    kustomize,
    mount_sources,
    parse_fedq,
    read_image,
    render_overlay,
    rewrite_paths,
    secret_volume,
)

from fedq.ops import k8s_federation, k8s_manifests, k8s_overlays

needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (it renders the kustomize "
                                   "overlays); .ci/run installs it where a package is available")
# The kubectl here is 1.32; the newest schema kubernetes-validate ships is the "current" version.
SCHEMA_VERSIONS = ("1.32",)


def _key(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    out = {"base": kustomize(DEPLOY / "base")}
    for p in OVERLAYS:
        # secure's and hub's Secrets are generated from files made first (their READMEs): made here the same way.
        if p.name == "secure" and shutil.which("openssl") is None:
            continue  # (it makes the CA; test_deploy_secure.py says so when it skips)
        out[p.name] = render_overlay(p, tmp_path_factory.mktemp(p.name))
    return out


def test_there_are_a_dev_a_per_site_a_secure_and_a_hub_overlay() -> None:
    assert {p.name for p in OVERLAYS} >= {"dev", "sites", "secure", "hub"}


# --- schema and our own checks ------------------------------------------------------------------
@needs_kubectl
@pytest.mark.slow
def test_every_overlay_passes_strict_schema_validation(rendered: dict[str, list[dict[str, Any]]]) -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    versions = (*SCHEMA_VERSIONS, latest_version())
    for name, docs in rendered.items():
        assert docs, f"{name} rendered nothing"
        for doc in docs:
            for version in versions:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except Exception as exc:  # ValidationError, SchemaNotFoundError (an unknown kind)
                    raise AssertionError(f"{name}: {deploy_checks.kn(doc)} is invalid for Kubernetes "
                                         f"{version}: {exc}") from None


@needs_kubectl
def test_every_overlay_passes_our_own_checks(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name in ("dev", "sites", "secure", "hub", "gpu"):
        if name in rendered:
            assert deploy_checks.problems(rendered[name]) == [], name


@needs_kubectl
def test_dev_overlay_is_one_small_namespace(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["dev"]
    namespaces = [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"]
    assert namespaces == ["fedq-dev"]
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"fedq-dev"}
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert (config["FEDQ_CLIENTS"], config["FEDQ_ROUNDS"], config["FEDQ_LOCAL_EPOCHS"]) == ("2", "2", "1")


@needs_kubectl
def test_sites_overlay_gives_each_client_only_its_own_volume(rendered: dict[str, list[dict[str, Any]]]) -> None:
    jobs = [d for d in rendered["sites"] if d["kind"] == "Job" and d["metadata"]["name"] != "fedq-submit"]
    claims = []
    for job in jobs:
        spec = job["spec"]["template"]["spec"]
        job_claims = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v]
        assert len(job_claims) == 1, f"{job['metadata']['name']} mounts {job_claims}"
        mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == "/data")
        assert mount.get("readOnly") is True
        claims += job_claims
    assert len(jobs) == 2 and len(set(claims)) == 2, "each site has its own volume"
    assert not any(d["kind"] == "Job" and d["metadata"]["name"] == "fedq-clients" for d in rendered["sites"])


def _dev_job(rendered: dict[str, list[dict[str, Any]]], name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    docs = copy.deepcopy(rendered["dev"])
    return docs, next(d for d in docs if _key(d) == ("Job", name))


@needs_kubectl
@pytest.mark.parametrize("mutation", [
    "restartPolicy Sometimes", "restartPolicy Always in a Job", "completionMode Indexd", "unknown kind",
    "missing Secret", "Service selecting nothing", "too few client pods", "writable root filesystem",
    "no memory limit", "undefined $(VAR) in args",
])
def test_our_checks_catch_what_schema_validation_lets_through(rendered: dict[str, list[dict[str, Any]]],
                                                              mutation: str) -> None:
    import kubernetes_validate

    docs, job = _dev_job(rendered, "fedq-clients")
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    changed: dict[str, Any] = job
    if mutation == "restartPolicy Sometimes":
        pod["restartPolicy"] = "Sometimes"
    elif mutation == "restartPolicy Always in a Job":
        pod["restartPolicy"] = "Always"
    elif mutation == "completionMode Indexd":
        job["spec"]["completionMode"] = "Indexd"
    elif mutation == "unknown kind":
        job["kind"] = "Jobs"
    elif mutation == "missing Secret":
        next(v for v in pod["volumes"] if "secret" in v)["secret"]["secretName"] = "fedq-redis-password"
    elif mutation == "Service selecting nothing":
        changed = next(d for d in docs if _key(d) == ("Service", "fedq-redis"))
        changed["spec"]["selector"]["app.kubernetes.io/component"] = "rediss"
    elif mutation == "too few client pods":
        job["spec"]["completions"] = job["spec"]["parallelism"] = 1
    elif mutation == "writable root filesystem":
        container["securityContext"]["readOnlyRootFilesystem"] = False
    elif mutation == "no memory limit":
        del container["resources"]["limits"]["memory"]
    elif mutation == "undefined $(VAR) in args":
        container["args"][container["args"].index("$(FEDQ_RUN_ID)")] = "$(FEDQ_RUNID)"
    found = deploy_checks.problems(docs)
    assert found, f"our checks missed: {mutation}"
    if mutation in ("restartPolicy Sometimes", "completionMode Indexd"):
        # The gap these checks exist for: the schema has no enums, so strict validation passes.
        kubernetes_validate.validate(changed, SCHEMA_VERSIONS[0], strict=True)


# --- one source of truth --------------------------------------------------------------------------
def test_deploy_base_is_what_fedq_generates() -> None:
    """deploy/base is fedq k8s base's output: regenerate it with `fedq k8s base deploy/base`."""
    files = k8s_overlays.base_files()
    on_disk = {p.name for p in (DEPLOY / "base").iterdir()}
    assert on_disk == set(files), "deploy/base has files fedq does not generate (or lacks some)"
    for name, text in files.items():
        assert (DEPLOY / "base" / name).read_text() == text, \
            f"deploy/base/{name} differs from fedq's resources: run `fedq k8s base deploy/base`"


@needs_kubectl
@pytest.mark.slow
def test_fedq_k8s_manifest_equals_kustomize_over_deploy_base(tmp_path: Path) -> None:
    """The CLI's knobs change exactly what an overlay of deploy/base with the same knobs changes."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "namespace": "fl-test",
        "resources": [os.path.relpath(DEPLOY / "base", overlay)],  # kustomize takes no absolute roots
        "images": [{"name": "fedq", "newName": "registry.example.com/team/fedq", "newTag": "1.2.3"}],
        "patches": [
            {"patch": yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "fedq-config"},
                                      "data": {"FEDQ_RUN_ID": "manifest-test", "FEDQ_CLIENTS": "3",
                                               "FEDQ_ROUNDS": "7", "FEDQ_LOCAL_EPOCHS": "2"}})},
            {"patch": yaml.safe_dump({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "fedq-clients"},
                                      "spec": {"completions": 3, "parallelism": 3}})},
        ],
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    from_kustomize = {_key(d): d for d in kustomize(overlay)}

    done = subprocess.run(fedq_cmd("k8s", "manifest", "--clients", "3", "--rounds", "7", "--local-epochs", "2",
                                   "--image", "registry.example.com/team/fedq:1.2.3", "--namespace", "fl-test",
                                   "--run-id", "manifest-test", "--no-secret"),
                          env=cli_env(None), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    from_fedq = {_key(d): d for d in yaml.safe_load_all(done.stdout) if d}
    assert set(from_fedq) == set(from_kustomize)
    for key, doc in from_fedq.items():
        assert doc == from_kustomize[key], f"{key} differs between fedq k8s manifest and kustomize"


def test_manifest_with_a_secret_passes_our_checks_and_the_clients_models() -> None:
    from fedq.ops.k8s_apply import to_model

    docs = k8s_manifests.build(k8s_federation.Federation(clients=4, namespace="x", redis_password="p4ssw0rd-ok",
                                                          dashboard_token="a-dashboard-token-1234"))
    assert deploy_checks.problems(docs) == []
    for doc in docs:
        to_model(doc)  # the kubernetes client's own request objects take every field


@needs_kubectl
def test_every_rendered_resource_is_accepted_by_the_clients_models(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from fedq.ops.k8s_apply import to_model

    for docs in rendered.values():
        for doc in docs:
            to_model(doc)


def test_the_clients_models_reject_a_misspelt_field() -> None:
    from fedq.errors import ConfigError
    from fedq.ops.k8s_apply import to_model

    doc = k8s_manifests.clients_job(k8s_federation.Federation())
    doc["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(ConfigError, match="imagePullPolcy"):
        to_model(doc)


# --- every container command, through fedq's own parser -----------------------------------------
def _k8s_commands(docs: list[dict[str, Any]]) -> list[tuple[str, list[str], dict[str, str]]]:
    """Each fedq container's argv and environment, its Secret volumes written as the kubelet would
    (into a temporary directory) and the paths in its environment pointing there."""
    image = read_image()
    out = []
    tmp = Path(tempfile.mkdtemp(prefix="fedq-k8s-cmds-"))
    for i, d in enumerate(docs):
        spec = deploy_checks.pod_spec(d)
        if spec is None:
            continue
        indexed = d["kind"] == "Job" and d["spec"].get("completionMode") == "Indexed"
        volumes = {v["name"]: (secret_volume(v, docs, tmp / f"{i}-{v['name']}") if "secret" in v
                               else tmp / f"{i}-{v['name']}") for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            if not deploy_checks.is_fedq_image(c["image"]):
                continue
            env = container_env(c, docs, {"JOB_COMPLETION_INDEX": "0"} if indexed else {})
            mounts = mount_sources(c, volumes, env)
            env = {k: rewrite_paths(v, mounts) for k, v in env.items()}
            out.append((f"{deploy_checks.kn(d)}/{c['name']}", container_argv(c, image, env), env))
    return out


def _parse_all(commands: list[tuple[str, list[str], dict[str, str]]]) -> dict[str, str]:
    failures = {}
    for where, argv, env in commands:
        try:
            parse_fedq(argv, env)
        except ParseError as exc:
            failures[where] = str(exc)
    return failures


@needs_kubectl
@pytest.mark.parametrize("overlay", ["dev", "sites", "gpu"])
def test_every_kubernetes_container_command_parses(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    commands = _k8s_commands(rendered[overlay])
    roles = {argv[1] for _, argv, _ in commands}
    assert {"aggregator", "submit", "client", "dashboard"} <= roles
    assert _parse_all(commands) == {}


def test_every_compose_command_parses() -> None:
    image = read_image()
    project = compose_project({})
    commands = []
    for name, svc in project["services"].items():
        if is_fedq_service(svc):
            mounts = compose_secret_mounts(svc, project)
            env = {k: rewrite_paths(v, mounts) for k, v in {**image.env, **compose_env(svc)}.items()}
            commands.append((name, compose_argv(svc, image), env))
    assert {argv[1] for _, argv, _ in commands} == {"aggregator", "submit", "client", "dashboard"}
    assert _parse_all(commands) == {}


@needs_kubectl
def test_a_typo_in_a_flag_fails_the_parse(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs, job = _dev_job(rendered, "fedq-clients")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    args[args.index("--shard")] = "--shrad"
    failures = _parse_all(_k8s_commands(docs))
    assert list(failures) == ["Job/fedq-clients/client"] and "--shrad" in failures["Job/fedq-clients/client"]

    docs, job = _dev_job(rendered, "fedq-submit")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    args[args.index("$(FEDQ_ROUNDS)")] = "two"  # a value of the wrong type is caught too
    assert list(_parse_all(_k8s_commands(docs))) == ["Job/fedq-submit/submit"]


def test_bad_settings_in_a_containers_environment_fail_the_parse() -> None:
    argv = ["fedq", "aggregator"]
    parse_fedq(argv, {"FEDQ_LOG_LEVEL": "INFO", "FEDQ_BLOCK_SECONDS": "1"})
    with pytest.raises(ParseError):
        parse_fedq(argv, {"FEDQ_LOG_LEVEL": "LOUD"})
    with pytest.raises(ParseError):
        parse_fedq(argv, {"FEDQ_BLOCK_SECONDS": "soon"})
    with pytest.raises(ParseError):
        parse_fedq(["fedq", "client", "--shard", "0", "--once", "--csv"], {})


def test_the_dashboard_command_exists() -> None:
    """Both descriptors start `fedq dashboard --host 0.0.0.0 --port 8050`."""
    assert fedq_command_exists("dashboard"), "fedq has no dashboard command (yet)"


# --- compose file structure ----------------------------------------------------------------------
COMPOSE_SERVICE_KEYS = {"image", "build", "command", "entrypoint", "environment", "depends_on", "restart",
                        "read_only", "tmpfs", "cap_drop", "security_opt", "volumes", "healthcheck", "ports",
                        "pull_policy", "user", "secrets", "expose", "profiles"}


def test_compose_file_structure() -> None:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    services = compose_services({})
    declared_volumes = set(data.get("volumes", {}))
    for name, svc in services.items():
        assert set(svc) <= COMPOSE_SERVICE_KEYS, f"{name}: unknown keys {set(svc) - COMPOSE_SERVICE_KEYS}"
        assert svc.get("restart", "no") in ("no", "always", "on-failure", "unless-stopped"), name
        assert svc.get("pull_policy", "missing") in ("always", "never", "missing", "build", "if_not_present"), name
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert cond["condition"] in ("service_started", "service_healthy", "service_completed_successfully")
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s health check, which it lacks"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            assert source.startswith((".", "/")) or source in declared_volumes, f"{name}: volume {source} undeclared"
    redis = services["redis"]
    # The password reaches Redis from the mounted secret, never as an argument.
    assert redis["command"][:2] == ["sh", "-c"]
    assert "requirepass $(cat /run/secrets/redis-password)" in redis["command"][2]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(v.split(":")[0] in declared_volumes and v.split(":")[1] == "/data" for v in redis["volumes"])
    clients = {n: s for n, s in services.items() if is_fedq_service(s) and s["command"][0] == "client"}
    shards = sorted(int(s["command"][s["command"].index("--shard") + 1]) for s in clients.values())
    assert shards == list(range(len(clients))) and len(clients) >= 2
    mounts = [next(v for v in s["volumes"] if v.split(":")[1] == "/data") for s in clients.values()]
    assert len({m.split(":")[0] for m in mounts}) == len(clients), "each client has its own data mount"
    submit = next(s for s in services.values() if is_fedq_service(s) and s["command"][0] == "submit")
    assert int(submit["command"][submit["command"].index("--clients") + 1]) == len(clients)
    assert sum("build" in s for s in services.values()) == 1, "one service builds the image the others use"
