"""Helpers of the deployment tests: render overlays, read the image's facts, resolve a container's
environment and arguments the way the kubelet (or compose) does, parse fedq commands with fedq's
own CLI parser, and run "pods as processes" against a local Redis.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import yaml
from support.procs import cli_env as support_cli_env
from support.procs import fedq_cmd
from support.redis import free_port

from fedq.roles.localredis import find_server

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = sorted(p.parent for p in (DEPLOY / "overlays").glob("*/kustomization.yaml"))
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_SECURE_FILE = ROOT / "docker-compose.secure.yml"
DOCKERFILE = ROOT / "workers" / "Dockerfile"
KUBECTL = shutil.which("kubectl")


def cli_env(redis_url: str | None = None, **extra: str) -> dict[str, str]:
    """support.procs.cli_env with output 100 columns wide (the deploy tests read help text)."""
    return support_cli_env(redis_url, **{"COLUMNS": "100", **extra})


# --- rendering -------------------------------------------------------------------------------
def kustomize(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIR` as a list of resources."""
    assert KUBECTL, "kubectl is not installed"
    done = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {directory} failed:\n{done.stderr}"
    return [d for d in yaml.safe_load_all(done.stdout) if d]


# --- the image ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Image:
    """What workers/Dockerfile says about the running container."""

    base: str
    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]
    user: str | None
    healthcheck: list[str] | None
    runs: list[str]
    copies: list[tuple[list[str], str]]


# The redis image's entrypoint hands its arguments to redis-server (and drops root, which the
# manifests do not need): as a process, its command is just its arguments.
REDIS_IMAGE = Image(base="redis", entrypoint=[], cmd=["redis-server"], env={}, user=None, healthcheck=None,
                    runs=[], copies=[])


def _instructions(text: str) -> Iterator[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            yield word.upper(), rest.strip()


def _exec_form(rest: str) -> list[str]:
    rest = rest.strip()
    return json.loads(rest) if rest.startswith("[") else ["/bin/sh", "-c", rest]


def image_stages(path: Path = DOCKERFILE) -> tuple[dict[str, str], dict[str, tuple[str, list[tuple[str, str]]]]]:
    """A Dockerfile's build arguments (ARG before the first FROM, with their defaults) and each
    build stage: its name -> (what it is FROM, its instructions)."""
    args: dict[str, str] = {}
    stages: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    current: list[tuple[str, str]] | None = None
    for word, rest in _instructions(path.read_text()):
        if word == "FROM":
            words = rest.split()
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else str(len(stages))
            current = []
            stages[name] = (words[0], current)
        elif current is None and word == "ARG":
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip()
        elif current is not None:
            current.append((word, rest))
    return args, stages


def read_image(path: Path = DOCKERFILE, role: str | None = None, stage: str | None = None) -> Image:
    """The image `docker build` makes (of the last stage, or of stage), with --build-arg ROLE=role."""
    args, stages = image_stages(path)
    if role is not None:
        args["ROLE"] = role
    name = stage or list(stages)[-1]
    chain: list[tuple[str, str]] = []
    while name in stages:  # back through the stages it is built FROM, to the base image
        base, instructions = stages[name]
        chain[:0] = instructions
        name = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    entrypoint, cmd, user, health = [], [], None, None
    env: dict[str, str] = {}
    runs: list[str] = []
    copies: list[tuple[list[str], str]] = []
    for word, rest in chain:
        if word == "ENV":
            for token in shlex.split(rest):
                k, _, v = token.partition("=")
                env[k] = v
        elif word == "ENTRYPOINT":
            entrypoint = _exec_form(rest)
        elif word == "CMD":
            cmd = _exec_form(rest)
        elif word == "USER":
            user = rest
        elif word == "RUN":
            runs.append(" ".join(rest.split()))
        elif word == "COPY" and "--from=" in rest:  # what another stage copied in, at the same place
            copies += read_image(path, role, rest.split("--from=", 1)[1].split()[0]).copies
        elif word == "COPY":
            parts = [p for p in rest.split() if not p.startswith("--")]
            copies.append((parts[:-1], parts[-1]))
        elif word == "HEALTHCHECK":
            health = _exec_form(rest.split("CMD", 1)[1]) if "CMD" in rest else None
    return Image(name, entrypoint, cmd, env, user, health, runs, copies)


# --- kubelet semantics -----------------------------------------------------------------------
_KUBE_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def kube_expand(text: str, env: dict[str, str]) -> str:
    """$(VAR) -> its value when defined (else left as it is), $$ -> $: the kubelet's rules."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _KUBE_REF.sub(sub, text)


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


# The downward-API field the Job controller points JOB_COMPLETION_INDEX at.
COMPLETION_INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def container_env(c: dict[str, Any], docs: list[dict[str, Any]], extra: dict[str, str] | None = None,
                  overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the kubelet gives a container: envFrom, then env in order (with expansion).

    extra is what the Job controller adds (JOB_COMPLETION_INDEX): after the container's own
    variables, so $(...) in them cannot see it unless the container defines it itself (from the
    completion-index annotation, which this resolves from extra). overrides replace ConfigMap
    values, as an overlay's patch would.
    """
    configmaps, secrets = by_kind(docs, "ConfigMap"), by_kind(docs, "Secret")
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        if "configMapRef" in src:
            data = dict(configmaps[src["configMapRef"]["name"]].get("data", {}))
            data.update({k: v for k, v in (overrides or {}).items() if k in data})
        else:
            data = {k: base64.b64decode(v).decode() for k, v in secrets[src["secretRef"]["name"]]["data"].items()}
        env.update({src.get("prefix", "") + k: v for k, v in data.items()})
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = kube_expand(e["value"], env)
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = base64.b64decode(secrets[ref["name"]]["data"][ref["key"]]).decode()
        elif "configMapKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["configMapKeyRef"]
            env[e["name"]] = configmaps[ref["name"]]["data"][ref["key"]]
        elif "fieldRef" in e.get("valueFrom", {}):
            path = e["valueFrom"]["fieldRef"]["fieldPath"]
            assert path == COMPLETION_INDEX_FIELD and "JOB_COMPLETION_INDEX" in (extra or {}), \
                f"env {e['name']}: a field the harness does not know (or not an Indexed Job's pod): {path}"
            env[e["name"]] = (extra or {})["JOB_COMPLETION_INDEX"]
        else:
            raise AssertionError(f"env {e['name']}: a source the harness does not know: {e}")
    env.update({k: v for k, v in (extra or {}).items() if k not in env})
    return env


def secret_volume(v: dict[str, Any], docs: list[dict[str, Any]], directory: Path) -> Path:
    """A Secret volume as the kubelet writes it: its keys (or items) as files in directory."""
    secret = by_kind(docs, "Secret")[v["secret"]["secretName"]]
    data = {k: base64.b64decode(val) for k, val in secret.get("data", {}).items()}
    items = v["secret"].get("items") or [{"key": k, "path": k} for k in data]
    for item in items:
        path = directory / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data[item["key"]])
        path.chmod(0o600)
    return directory


def mount_sources(c: dict[str, Any], volumes: dict[str, Path], env: dict[str, str]) -> dict[str, Path]:
    """mountPath -> the local path standing in for it: the volume's directory, or the file or
    directory in it that subPath (or subPathExpr, expanded with the container's variables) names."""
    out = {}
    for m in c.get("volumeMounts", []):
        local = volumes[m["name"]]
        if "subPathExpr" in m:
            local = local / kube_expand(m["subPathExpr"], env)
        elif "subPath" in m:
            local = local / m["subPath"]
        out[m["mountPath"]] = local
    return out


def container_argv(c: dict[str, Any], image: Image, env: dict[str, str]) -> list[str]:
    """command + args after $(VAR) expansion; the image's ENTRYPOINT/CMD where they are not set."""
    command = c.get("command") or image.entrypoint
    args = c.get("args") if "args" in c else ([] if "command" in c else image.cmd)
    return [kube_expand(str(a), env) for a in [*command, *args]]


# --- compose semantics -------------------------------------------------------------------------
_COMPOSE_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def compose_interpolate(value: Any, variables: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err} and $$, through lists and maps."""
    if isinstance(value, dict):
        return {k: compose_interpolate(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [compose_interpolate(v, variables) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        current = variables.get(name)
        if op in (":-", "-"):
            unset = current is None or (op == ":-" and current == "")
            return arg if unset else current
        if op in (":?", "?"):
            if current is None or (op == ":?" and current == ""):
                raise AssertionError(f"compose variable {name} is required: {arg}")
            return current
        return current or ""
    return _COMPOSE_REF.sub(sub, value)


def _mount_target(key: str, entry: Any) -> str:
    """Where a compose `secrets` or `volumes` entry (short or long form) lands in the container."""
    if isinstance(entry, dict):
        return str(entry.get("target") or entry.get("source"))
    return entry.split(":")[1] if key == "volumes" else entry


def _compose_merge_service(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """compose's merge of one service over another (`-f a.yml -f b.yml`): environment key by key,
    mappings (healthcheck, depends_on) key by key, secrets and volumes joined (an override's
    entry replaces one of the same target), anything else (command, entrypoint, ...) replaced."""
    out = dict(base)
    for key, value in override.items():
        if key == "environment":
            out[key] = {**compose_env({"environment": base.get(key, {})}), **compose_env({"environment": value})}
        elif key in ("secrets", "volumes") and key in base:
            mine = {_mount_target(key, e) for e in value}
            out[key] = [e for e in base[key] if _mount_target(key, e) not in mine] + list(value)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = {**base[key], **value}
        else:
            out[key] = value
    return out


def compose_project(variables: dict[str, str], files: tuple[Path, ...] = (COMPOSE_FILE,)) -> dict[str, Any]:
    """The compose files merged in order and interpolated: services, volumes, secrets."""
    project: dict[str, Any] = {"services": {}, "volumes": {}, "secrets": {}}
    for path in files:
        data = yaml.safe_load(path.read_text())
        for name, svc in data.get("services", {}).items():
            current = project["services"].get(name)
            project["services"][name] = svc if current is None else _compose_merge_service(current, svc)
        for top in ("volumes", "secrets"):
            project[top].update(data.get(top) or {})
    return compose_interpolate(project, variables)


def compose_services(variables: dict[str, str], files: tuple[Path, ...] = (COMPOSE_FILE,)) -> dict[str, dict[str, Any]]:
    return compose_project(variables, files)["services"]


def compose_secret_mounts(svc: dict[str, Any], project: dict[str, Any]) -> dict[str, Path]:
    """/run/secrets/<target> -> the host file of a service's compose secrets (relative to the project)."""
    out = {}
    for entry in svc.get("secrets", []):
        source = entry if isinstance(entry, str) else entry["source"]
        target = entry if isinstance(entry, str) else entry.get("target", source)
        out[f"/run/secrets/{target}"] = ROOT / project["secrets"][source]["file"]
    return out


def compose_argv(svc: dict[str, Any], image: Image) -> list[str]:
    def as_list(v: Any) -> list[str]:
        return shlex.split(v) if isinstance(v, str) else [str(x) for x in v]
    entry = as_list(svc["entrypoint"]) if "entrypoint" in svc else image.entrypoint
    cmd = as_list(svc["command"]) if "command" in svc else image.cmd
    return [*entry, *cmd]


def compose_env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def is_fedq_service(svc: dict[str, Any]) -> bool:
    return "build" in svc or str(svc.get("image", "")).split(":")[0].rsplit("/", 1)[-1] == "fedq"


# --- fedq's own parser ---------------------------------------------------------------------------
class ParseError(AssertionError):
    pass


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update({k: v for k, v in saved.items() if not k.startswith("FEDQ_")})
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def parse_fedq(argv: list[str], env: dict[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    """Parse `fedq ...` with fedq's click parser (no command runs): (subcommand, its parameters).

    The container's environment is in place while parsing, so FEDQ_* variables that click reads
    (FEDQ_REDIS_URL, FEDQ_LOG_LEVEL) are checked too, and so is fedq's Settings.from_env.
    """
    import click

    from fedq.cli import main
    from fedq.errors import FedqError
    from fedq.settings import Settings

    if not argv or Path(argv[0]).name != "fedq":
        raise ParseError(f"not a fedq command: {argv}")
    with _environ(env or {}):
        try:
            Settings.from_env()
            ctx = main.make_context("fedq", list(argv[1:]))
            rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
            if not rest:
                raise ParseError(f"{argv}: no fedq subcommand")
            name, cmd, sub = main.resolve_command(ctx, rest)
            assert cmd is not None and name is not None
            while isinstance(cmd, click.Group):  # fedq k8s ..., fedq kfp ...
                group_ctx = cmd.make_context(name, sub, parent=ctx)
                rest = [*getattr(group_ctx, "_protected_args", []), *group_ctx.args]
                name, cmd, sub = cmd.resolve_command(group_ctx, rest)
                ctx = group_ctx
            sub_ctx = cmd.make_context(name, list(sub), parent=ctx)
        except click.exceptions.Exit as exc:
            raise ParseError(f"{argv}: exits early ({exc})") from None
        except (click.ClickException, FedqError) as exc:
            msg = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
            raise ParseError(f"{shlex.join(argv)}: {msg}") from None
    return name, sub_ctx.params


def fedq_command_exists(name: str) -> bool:
    from fedq.cli import main

    return name in main.commands


# --- pods as processes -------------------------------------------------------------------------
@dataclass
class Proc:
    """One container of a pod (or compose service) started as a local process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    one_shot: bool  # a Job's container (or a compose service expected to exit)
    popen: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def tail(self, lines: int = 40) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class LocalRedis:
    """A redis-server started from a Redis container's own arguments, on a free loopback port."""

    argv: list[str]
    data_dir: Path
    port: int = field(default_factory=free_port)
    password: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    # How the test connects when a password is not enough (ACL users, TLS): redis.Redis arguments.
    client_kwargs: dict[str, Any] | None = None

    def server_argv(self) -> list[str]:
        """The container's own flags, then this machine's: loopback only and a free port (the TLS
        port when the container serves TLS, keeping its plain port off). A container that starts
        Redis through ``sh -c SCRIPT redis-server ARGS`` runs the same, with this machine's
        redis-server first on PATH and these flags after its own."""
        args = list(self.argv)
        if args[:2] == ["sh", "-c"]:
            if "--tls-port" in args:
                args[args.index("--tls-port") + 1] = str(self.port)
                return [*args, "--bind", "127.0.0.1"]
            return [*args, "--port", str(self.port), "--bind", "127.0.0.1"]
        assert Path(args[0]).name == "redis-server", f"the Redis container runs {args[0]}, not redis-server"
        if "--tls-port" in args:
            args[args.index("--tls-port") + 1] = str(self.port)
            return [find_server(), *args[1:], "--bind", "127.0.0.1"]
        return [find_server(), *args[1:], "--port", str(self.port), "--bind", "127.0.0.1"]

    def start(self) -> None:
        args = list(self.argv)
        if "--requirepass" in args:
            self.password = args[args.index("--requirepass") + 1]
        env = None
        if args[:2] == ["sh", "-c"]:
            # The password file the script feeds Redis (already a local path): the test's own password.
            found = re.search(r"requirepass \$\(cat (\S+)\)", args[2])
            if found:
                self.password = Path(found.group(1)).read_text().strip()
            env = {**os.environ, "PATH": f"{Path(find_server()).parent}{os.pathsep}{os.environ['PATH']}"}
        self.proc = subprocess.Popen(self.server_argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     cwd=self.data_dir, env=env)
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError(f"redis-server from {args} did not start") from None
                time.sleep(0.05)

    def client(self) -> redis.Redis:
        if self.client_kwargs is not None:
            return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **self.client_kwargs)
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def local_redis_cli(command: str, port: int) -> str:
    """A probe's shell command with its redis-cli aimed at the local server's port (the container's
    redis-cli talks to its own Redis on the default port)."""
    assert "redis-cli " in command, command
    return command.replace("redis-cli ", f"redis-cli -p {port} ")


def run_shell(command: str, env: dict[str, str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """A probe's `sh -c` command with the container's environment (and this machine's PATH)."""
    return subprocess.run(["sh", "-c", command], env={"PATH": os.environ["PATH"], **env}, capture_output=True,
                          text=True, timeout=timeout)


def make_pki(directory: Path, names: tuple[str, ...] = ("fedq-redis",)) -> Path:
    """A CA (ca.crt) and a certificate signed by it (tls.crt, tls.key), as a kubernetes.io/tls
    Secret holds them, for the given DNS names and 127.0.0.1; no extendedKeyUsage, so the one
    certificate serves Redis and its clients."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    directory.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=fedq-test-ca")
    (directory / "san.ext").write_text("subjectAltName=" + ",".join([*(f"DNS:{n}" for n in names), "IP:127.0.0.1"])
                                       + "\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=fedq-redis")
    openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", "tls.crt",
            "-days", "2", "-extfile", "san.ext")
    return directory


def render_secure_overlay(tmp: Path, pki: Path, clients: int = 2) -> tuple[list[dict[str, Any]], Path]:
    """deploy/ copied into tmp, secrets/ made the way the overlay's README says (fedq acl --out,
    the CA's files), and `kubectl kustomize` of the copy: (resources, the secrets directory)."""
    copy = tmp / "deploy"
    shutil.copytree(DEPLOY, copy, ignore=shutil.ignore_patterns("secrets"))
    secrets_dir = copy / "overlays" / "secure" / "secrets"
    done = subprocess.run(fedq_cmd("acl", "--clients", str(clients), "--out", str(secrets_dir)), env=cli_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for name in ("ca.crt", "tls.crt", "tls.key"):
        shutil.copy(pki / name, secrets_dir / name)
    (secrets_dir / "dashboard-token").write_text("secure-overlay-dashboard-token\n")
    return kustomize(copy / "overlays" / "secure"), secrets_dir


def render_hub_overlay(tmp: Path, sites: tuple[str, ...] = ("site-a", "site-b")) -> tuple[list[dict[str, Any]], Path]:
    """deploy/ copied into tmp, the hub overlay's secrets/ made as its README says (as `fedq k8s
    hub-secrets` makes them, for the hub at 127.0.0.1), and `kubectl kustomize` of the copy."""
    from fedq.ops.k8s_hub import write_hub_secrets

    copy = tmp / "deploy"
    shutil.copytree(DEPLOY, copy, ignore=shutil.ignore_patterns("secrets"))
    secrets_dir = copy / "overlays" / "hub" / "secrets"
    write_hub_secrets(secrets_dir, sites, ["127.0.0.1", "hub.example.org"])
    return kustomize(copy / "overlays" / "hub"), secrets_dir


def render_overlay(overlay: Path, tmp: Path) -> list[dict[str, Any]]:
    """An overlay's resources; those whose Secrets come from files (secure, hub) with the files made first."""
    if overlay.name == "secure":
        return render_secure_overlay(tmp / "secure", make_pki(tmp / "pki"))[0]
    if overlay.name == "hub":
        return render_hub_overlay(tmp / "hub")[0]
    return kustomize(overlay)


def rewrite_paths(value: str, mounts: dict[str, Path]) -> str:
    """A container path under a mount, as the local directory standing in for that mount."""
    if "\n" in value or " " in value:  # a shell script: every path in it under a mount
        for mount, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
            value = re.sub(re.escape(mount.rstrip("/")) + r"(?=[/\s)\"']|$)", str(local), value)
        return value
    for mount, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
        if value == mount or value.startswith(mount.rstrip("/") + "/"):
            return str(local) + value[len(mount.rstrip("/")):]
    return value


def map_hosts(value: str, hosts: dict[tuple[str, int], str]) -> str:
    """host:port of a Service (or compose service), in any of its DNS forms, as the local address."""
    for (name, port), local in hosts.items():
        value = re.sub(rf"(?<=[@/]){re.escape(name)}(?:\.[a-z0-9-]+)*:{port}(?=/|$)", local, value)
    return value


def start(procs: list[Proc], log_dir: Path, workdir: Path) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    for p in procs:
        argv = list(p.argv)
        if Path(argv[0]).name == "fedq":
            # The image's `fedq` is this checkout's, started as every test starts it (the console
            # script of an environment may be another checkout's).
            argv = fedq_cmd(*argv[1:])
        env = {"PATH": os.environ["PATH"], "PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8",
               **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}, **p.env}
        p.log = log_dir / f"{p.name}.log"
        with open(p.log, "wb") as out:
            p.popen = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, cwd=workdir)


def stop(procs: list[Proc]) -> None:
    for p in procs:
        if p.popen is not None and p.popen.poll() is None:
            p.popen.terminate()
    deadline = time.monotonic() + 15
    for p in procs:
        if p.popen is not None:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()


def wait_for_run(procs: list[Proc], r: redis.Redis, run_id: str, timeout: float) -> dict[str, str]:
    """Block until the run ends; fail at once when a process exits with an error."""
    from fedq.protocol.store import RunStore
    from fedq.protocol.vocabulary import ENDED

    store = RunStore(r, run_id)
    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            code = p.popen.poll() if p.popen else None
            if code not in (None, 0):
                raise AssertionError(f"{p.name} exited {code}: {shlex.join(p.argv)}\n{p.tail()}")
            if code == 0 and not p.one_shot:
                raise AssertionError(f"{p.name} (a long-running container) exited:\n{p.tail()}")
        state = store.state()
        if state.get("status") in ENDED:
            return state
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.tail(15)}" for p in procs)
            raise AssertionError(f"run {run_id} did not end within {timeout:g} s: {state}\n{logs}")
        time.sleep(0.5)


def wait_one_shots(procs: list[Proc], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        if p.one_shot and p.popen is not None:
            try:
                code = p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{p.name} did not exit after the run ended:\n{p.tail()}") from None
            assert code == 0, f"{p.name} exited {code}:\n{p.tail()}"


def tmpdir(parent: Path, name: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=parent))
    path.chmod(0o755)
    return path
