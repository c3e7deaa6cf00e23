"""Secrets never reach a command line: every manifest, compose file and the compiled pipeline.

Each rendering is searched in its args and command (and compose's command and healthcheck test)
for a secret value it was made with and for a $(...PASSWORD) reference the kubelet would expand
there. Also: Redis started exactly as its container starts it (as a local process) reads the
password from the mounted file; the dashboard answers 401 without its token.
"""

from __future__ import annotations

import base64
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import deploy_checks
import pytest
import redis
import yaml
from deploy_harness import (
    COMPOSE_FILE,
    COMPOSE_SECURE_FILE,
    DEPLOY,
    KUBECTL,
    OVERLAYS,
    ROOT,
    LocalRedis,
    cli_env,
    compose_project,
    compose_secret_mounts,
    container_argv,
    container_env,
    fedq_cmd,
    kustomize,
    mount_sources,
    render_overlay,
    rewrite_paths,
    secret_volume,
    tmpdir,
)

from fedq.ops import k8s_federation, k8s_manifests

PASSWORD_REF = re.compile(r"\$\([A-Za-z0-9_]*PASSWORD[A-Za-z0-9_]*\)")
# Flags that would carry a secret value on a command line.
SECRET_FLAGS = ("--requirepass", "--masterauth", "-a", "--pass", "--redis-password", "--token")
TLS_COMPOSE = ROOT / "docker-compose.tls.yml"
KFP_PYTHON = ROOT / "build" / "kfp-venv" / "bin" / "python"


def command_lines(doc: dict[str, Any]) -> Iterator[tuple[str, list[str]]]:
    """(where, args) of every container's command and args, and every exec probe, of a resource."""
    spec = deploy_checks.pod_spec(doc)
    if spec is None:
        return
    for c in deploy_checks.containers(spec):
        where = f"{deploy_checks.kn(doc)}/{c['name']}"
        yield f"{where} command", [str(a) for a in c.get("command", [])]
        yield f"{where} args", [str(a) for a in c.get("args", [])]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if "exec" in c.get(probe, {}):
                yield f"{where} {probe}", [str(a) for a in c[probe]["exec"]["command"]]


def secret_values(docs: list[dict[str, Any]]) -> set[str]:
    """Every value of every Secret in a rendering (and each line of multi-line ones)."""
    out: set[str] = set()
    for d in docs:
        if d.get("kind") == "Secret":
            for v in (d.get("data") or {}).values():
                text = base64.b64decode(v).decode(errors="replace")
                out |= {text.strip()} | {line.split("=", 1)[-1].strip() for line in text.splitlines()}
            out |= {str(v).strip() for v in (d.get("stringData") or {}).values()}
    return {v for v in out if len(v) >= 6}


def leaks(lines: Iterator[tuple[str, list[str]]], secrets: set[str]) -> list[str]:
    found = []
    for where, argv in lines:
        for i, arg in enumerate(argv):
            if PASSWORD_REF.search(arg):
                found.append(f"{where}: {arg!r} expands a password")
            if arg in SECRET_FLAGS and i + 1 < len(argv):
                found.append(f"{where}: {arg} {argv[i + 1]!r}")
            for s in secrets:
                if s in arg:
                    found.append(f"{where}: a secret value in {arg[:40]!r}")
    return found


def test_leaks_finds_a_password_in_args_and_a_reference() -> None:
    """The search itself can fail: the way the manifests were before, it finds both."""
    doc = k8s_manifests.redis_statefulset()
    doc["spec"]["template"]["spec"]["containers"][0]["args"] += ["--requirepass", "$(REDIS_PASSWORD)"]
    assert len(leaks(command_lines(doc), set())) == 2
    probe = k8s_manifests.redis_statefulset()
    probe["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"][2] = \
        "redis-cli -a s3cret-value ping"
    assert leaks(command_lines(probe), {"s3cret-value"})


# --- Kubernetes --------------------------------------------------------------------------------
def _manifest(*args: str) -> list[dict[str, Any]]:
    done = subprocess.run(fedq_cmd("k8s", "manifest", *args), env=cli_env(None), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def test_fedq_k8s_manifest_takes_secrets_from_files_and_puts_none_on_a_command_line(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("file-password-123\n")
    (tmp_path / "token").write_text("file-dashboard-token-123\n")
    (tmp_path / "acl").mkdir()
    done = subprocess.run(fedq_cmd("acl", "--clients", "2", "--out", str(tmp_path / "acl")), env=cli_env(None),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    renders = {
        "password": _manifest("--redis-password-file", str(tmp_path / "pw"), "--dashboard-token-file",
                              str(tmp_path / "token"), "--service-monitor"),
        "random": _manifest(),
        "acl+tls": _manifest("--acl-passwords", str(tmp_path / "acl" / "passwords.env"), "--tls-secret", "t"),
        "other instance": _manifest("--instance", "second", "--redis-password-file", str(tmp_path / "pw")),
    }
    for name, docs in renders.items():
        secrets = secret_values(docs)
        assert secrets, f"{name}: rendered no Secret to search for"
        assert leaks((line for d in docs for line in command_lines(d)), secrets) == [], name
    secrets = secret_values(renders["password"])
    assert {"file-password-123", "file-dashboard-token-123"} <= secrets
    # The password is no option at all any more.
    old = subprocess.run(fedq_cmd("k8s", "manifest", "--redis-password", "x" * 12), env=cli_env(None),
                         capture_output=True, text=True, timeout=120)
    assert old.returncode != 0 and "No such option" in old.stderr


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (it renders the kustomize overlays)")
def test_no_overlay_puts_a_secret_on_a_command_line(tmp_path: Path) -> None:
    for overlay in OVERLAYS:
        docs = render_overlay(overlay, tmpdir(tmp_path, overlay.name))
        secrets = secret_values(docs)
        assert secrets, overlay.name
        assert leaks((line for d in docs for line in command_lines(d)), secrets) == [], overlay.name
    base = kustomize(DEPLOY / "base")
    assert leaks((line for d in base for line in command_lines(d)), set()) == []


def test_redis_reads_its_password_from_the_mounted_file_as_its_container_starts_it(tmp_path: Path) -> None:
    """The StatefulSet's own command and args, run here: Redis requires the Secret's password,
    no process has it among its arguments, and the probe passes with REDISCLI_AUTH alone."""
    docs = k8s_manifests.build(k8s_federation.Federation(redis_password="mounted-pass-42",
                                                        dashboard_token="t" * 20))
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    spec = sts["spec"]["template"]["spec"]
    c = spec["containers"][0]
    env = container_env(c, docs)
    volumes = {v["name"]: secret_volume(v, docs, tmp_path / v["name"]) for v in spec["volumes"]}
    volumes["data"] = tmp_path / "data"
    volumes["data"].mkdir()
    mounts = mount_sources(c, volumes, env)
    from deploy_harness import read_image  # the redis image runs what the container says

    argv = [rewrite_paths(a, mounts) for a in container_argv(c, read_image(), env)]
    server = LocalRedis(argv, tmp_path / "data")
    server.start()
    try:
        assert server.password == "mounted-pass-42"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port, password="wrong-password").ping()
        assert server.client().ping()
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert "mounted-pass-42" not in ps, "the password is some process's argument"
        probe = c["readinessProbe"]["exec"]["command"]
        script = probe[2].replace("redis-cli ", f"redis-cli -p {server.port} ")
        ok = subprocess.run(["sh", "-c", script], env={"PATH": "/usr/bin:/bin", **env}, timeout=20)
        assert ok.returncode == 0
        bad = subprocess.run(["sh", "-c", script], env={"PATH": "/usr/bin:/bin", **env, "REDISCLI_AUTH": "nope"},
                             timeout=20)
        assert bad.returncode != 0
    finally:
        server.stop()


# --- compose -----------------------------------------------------------------------------------
def test_no_compose_file_puts_a_secret_on_a_command_line() -> None:
    for files in [(COMPOSE_FILE,), (COMPOSE_FILE, COMPOSE_SECURE_FILE),
                  (COMPOSE_FILE, COMPOSE_SECURE_FILE, TLS_COMPOSE)]:
        project = compose_project({}, files)
        secrets: set[str] = set()
        for svc in project["services"].values():
            for path in compose_secret_mounts(svc, project).values():
                if path.exists() and path.suffix not in (".acl", ".crt", ".key"):
                    secrets.add(path.read_text().strip())
        assert secrets or len(files) > 1
        lines = []
        for name, svc in project["services"].items():
            cmd = svc.get("command") or []
            lines.append((f"{name} command", [str(a) for a in (cmd if isinstance(cmd, list) else cmd.split())]))
            test = (svc.get("healthcheck") or {}).get("test") or []
            lines.append((f"{name} healthcheck", [str(a) for a in test]))
            env = svc.get("environment") or {}
            for k, v in (env.items() if isinstance(env, dict) else []):
                assert "PASSWORD" not in k or k.endswith("_FILE"), f"{name}: {k} in the environment"
                assert not re.search(r"redis://[^@/]*:[^@/]+@", str(v)), f"{name}: a password in {k}"
        assert leaks(iter(lines), secrets) == [], files


# --- Kubeflow Pipelines ------------------------------------------------------------------------
@pytest.mark.skipif(not KFP_PYTHON.exists(), reason="no kfp environment: .ci/run builds build/kfp-venv with "
                    "pip install -e '.[kfp]' (kfp and kfp-kubernetes pin old kubernetes, so not in .venv)")
def test_compiled_pipeline_takes_redis_credentials_from_a_secret(tmp_path: Path) -> None:
    out = tmp_path / "pipeline.yaml"
    done = subprocess.run([str(KFP_PYTHON), "-m", "fedq", "kfp", "compile", "--clients", "2", "-o", str(out)],
                          env=cli_env(None, HOME=str(tmp_path)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(out.read_text()) if d]
    spec = docs[0]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert not any("password" in p.lower() for p in params), params
    for ex in spec["deploymentSpec"]["executors"].values():
        c = ex["container"]
        assert leaks(iter([("command", c.get("command", [])), ("args", c.get("args", []))]), set()) == []
    # kfp-kubernetes' platform spec: every task mounts the Redis Secret.
    platform = next(d for d in docs[1:] if "platforms" in d)["platforms"]["kubernetes"]["deploymentSpec"]
    executors = platform["executors"]
    assert len(executors) == len(spec["deploymentSpec"]["executors"])
    for name, ex in executors.items():
        volumes = ex.get("secretAsVolume", [])
        assert [v["secretName"] for v in volumes] == ["fedq-redis"], name
