"""Apply, inspect and remove a federation's resources through the Kubernetes API.

Every call goes through the ``kubernetes`` client's typed APIs with an ``ApiClient`` passed in
(connections are never global). A resource is created, or patched when it exists, so ``up`` twice
changes nothing; the Redis Secret is only ever created (a second ``up`` keeps the password Redis has), and
the run's Jobs are replaced only when the run id changed (a Job's pod template is immutable).
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from fedq.errors import ConfigError, FedqError
from fedq.ops.k8s_federation import CONFIG_MAP, INSTANCE, NAME, PART_OF, Federation, Resource
from fedq.ops.k8s_manifests import build, dashboard_secret, redis_secret

FIELD_MANAGER = "fedq"
# (API class, whether its objects live in a namespace) by kind; nothing else is ever applied.
_APIS = {
    "Namespace": ("CoreV1Api", False),
    "ConfigMap": ("CoreV1Api", True),
    "Secret": ("CoreV1Api", True),
    "Service": ("CoreV1Api", True),
    "PersistentVolumeClaim": ("CoreV1Api", True),
    "Pod": ("CoreV1Api", True),
    "Deployment": ("AppsV1Api", True),
    "StatefulSet": ("AppsV1Api", True),
    "Job": ("BatchV1Api", True),
    "NetworkPolicy": ("NetworkingV1Api", True),
}
# What `down` removes, in this order (workloads first, so nothing restarts against a gone Redis).
_DOWN_KINDS = ("Job", "Deployment", "StatefulSet", "Service", "NetworkPolicy", "ConfigMap",
               "Secret", "PersistentVolumeClaim")
SELECTOR = f"{PART_OF}={NAME}"


def instance_selector(instance: str) -> str:
    """The label selector of one federation's resources (others may share the namespace)."""
    return f"{PART_OF}={NAME},{INSTANCE}={instance}"


class ClusterError(FedqError):
    """The cluster refused or could not be reached; the message is one line for the CLI."""


def _snake(kind: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", kind).lower()


def model_of(kind: str) -> Any:
    """The client's model class of a kind (``V1Deployment`` for Deployment)."""
    from kubernetes import client

    return getattr(client, f"V1{kind}")


def to_model(resource: Resource) -> Any:
    """The resource as the client's own request object; ConfigError when it has fields the model lacks."""
    from kubernetes import client

    model = model_of(resource["kind"])
    if not hasattr(model, "from_dict"):  # clients before the pydantic models take plain dicts
        return resource
    try:
        obj = model.from_dict(resource)
    except Exception as exc:  # pydantic's ValidationError, without importing pydantic here
        raise ConfigError(f"{resource['kind']} {resource['metadata']['name']}: {_first_line(exc)}") from None
    back = client.ApiClient().sanitize_for_serialization(obj)
    if back != resource:
        raise ConfigError(f"{resource['kind']} {resource['metadata']['name']} has fields the Kubernetes "
                          f"client does not know: {_diff(resource, back)}")
    return obj


def _diff(a: Any, b: Any, path: str = "") -> str:
    """The first path at which two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b or a[k] != b[k]:
                return _diff(a.get(k), b.get(k), f"{path}.{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _diff(x, y, f"{path}[{i}]")
    return path.lstrip(".") or "(top level)"


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300]


@contextlib.contextmanager
def api_errors(what: str) -> Iterator[None]:
    """Turn the client's exceptions into ClusterError with one line of text."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as exc:
        raise ClusterError(f"{what}: {api_message(exc)}") from None
    except HTTPError as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ClusterError(f"{what}: cannot reach the Kubernetes API: {_first_line(reason)}") from None


def api_message(exc: Any) -> str:
    """'404 Not Found: <the API server's message>' from an ApiException."""
    message = ""
    with contextlib.suppress(Exception):
        message = json.loads(exc.body).get("message", "")
    return " ".join(f"{exc.status} {exc.reason}: {message}".split()).rstrip(":")


def _status(exc: Exception) -> int | None:
    from kubernetes.client.exceptions import ApiException

    return exc.status if isinstance(exc, ApiException) else None


class Cluster:
    """One namespace of the cluster an ApiClient talks to."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        from kubernetes import client

        self.api_client = api_client
        self.namespace = namespace
        self._apis = {name: getattr(client, name)(api_client) for name, _ in set(_APIS.values())}

    def _call(self, verb: str, kind: str, *args: Any, **kwargs: Any) -> Any:
        api_name, namespaced = _APIS[kind]
        method = f"{verb}_namespaced_{_snake(kind)}" if namespaced else f"{verb}_{_snake(kind)}"
        if namespaced:
            kwargs["namespace"] = self.namespace
        return getattr(self._apis[api_name], method)(*args, **kwargs)

    def read(self, kind: str, name: str) -> Any | None:
        """The object, or None when there is none."""
        from kubernetes.client.exceptions import ApiException

        try:
            return self._call("read", kind, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def check_namespace(self) -> None:
        """ClusterError when the namespace does not exist (fedq does not create namespaces)."""
        with api_errors(f"namespace {self.namespace}"):
            if self.read("Namespace", self.namespace) is None:
                raise ClusterError(f"namespace {self.namespace} does not exist; create it first "
                                   f"(kubectl create namespace {self.namespace}) or pass --namespace")

    def apply(self, resource: Resource) -> str:
        """Create the object, or patch it (strategic merge) when it exists; returns what was done."""
        from kubernetes.client.exceptions import ApiException

        body = to_model(resource)
        try:
            self._call("create", resource["kind"], body=body, field_manager=FIELD_MANAGER)
            return "created"
        except ApiException as exc:
            if exc.status != 409:
                raise
        # A dict body is sent as a strategic merge patch by every generation of the client.
        self._call("patch", resource["kind"], resource["metadata"]["name"], body=resource,
                   field_manager=FIELD_MANAGER)
        return "configured"

    def create(self, resource: Resource) -> Any:
        return self._call("create", resource["kind"], body=to_model(resource), field_manager=FIELD_MANAGER)

    def delete(self, kind: str, name: str) -> bool:
        """Delete (dependents in the background); False when it was not there."""
        from kubernetes.client.exceptions import ApiException

        try:
            # The answer (a Status, or the object for some kinds) is not needed: not decoded.
            self._call("delete", kind, name, propagation_policy="Background", _preload_content=False)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    def wait_gone(self, kind: str, name: str, timeout: float, sleep: Callable[[float], None] = time.sleep) -> None:
        deadline = time.monotonic() + timeout
        while self.read(kind, name) is not None:
            if time.monotonic() > deadline:
                raise ClusterError(f"{kind} {name} is still being deleted after {timeout:g} s")
            sleep(0.5)

    def list(self, kind: str, label_selector: str = SELECTOR) -> list[Any]:
        return list(self._call("list", kind, label_selector=label_selector).items)

    def config_data(self, name: str = CONFIG_MAP) -> dict[str, str]:
        """The data of the fedq ConfigMap in the cluster (empty when there is none)."""
        cm = self.read("ConfigMap", name)
        return dict(cm.data or {}) if cm is not None else {}


@dataclass(frozen=True)
class Action:
    kind: str
    name: str
    action: str  # created | configured | kept | replaced | deleted

    def __str__(self) -> str:
        return f"{self.kind.lower()}/{self.name} {self.action}"


def new_password() -> str:
    """A Redis password that needs no escaping in a redis:// URL."""
    return secrets.token_urlsafe(24)


def up(cluster: Cluster, fed: Federation, *, job_delete_timeout: float = 120.0,
       sleep: Callable[[float], None] = time.sleep) -> list[Action]:
    """Apply the federation's resources to the cluster's namespace; returns what happened to each."""
    password, token = fed.redis_password, fed.dashboard_token
    fed = replace(fed, namespace=cluster.namespace, redis_password=None, dashboard_token=None).validate()
    actions: list[Action] = []
    with api_errors(f"namespace {cluster.namespace}"):
        cluster.check_namespace()
        old_run = cluster.config_data(fed.config_map).get("FEDQ_RUN_ID")
        if fed.tls_secret and cluster.read("Secret", fed.tls_secret) is None:
            raise ClusterError(f"no Secret {fed.tls_secret} in namespace {cluster.namespace}: create it first "
                               f"(kubectl create secret generic {fed.tls_secret} --from-file=ca.crt "
                               "--from-file=tls.crt --from-file=tls.key)")
        # Secrets are only ever created: Redis already runs with the password it has.
        # (ACL users' Secrets are among the resources below, created or patched.)
        kept_secrets = [(fed.dashboard_secret, lambda: dashboard_secret(token or new_password(), fed))]
        if not fed.acl:
            kept_secrets.insert(0, (fed.redis_secret, lambda: redis_secret(password or new_password(), fed)))
        for name, make in kept_secrets:
            if cluster.read("Secret", name) is None:
                secret = make()
                secret["metadata"]["namespace"] = cluster.namespace
                cluster.create(secret)
                actions.append(Action("Secret", name, "created"))
            else:
                actions.append(Action("Secret", name, "kept"))
        for res in build(fed):
            kind, name = res["kind"], res["metadata"]["name"]
            job = cluster.read("Job", name) if kind == "Job" else None
            if job is not None:
                if old_run == fed.run_id:
                    actions.append(Action(kind, name, "kept"))  # this run's Job: leave it be
                    continue
                # Another run's Job: its pod template cannot change, so it is replaced.
                cluster.delete(kind, name)
                cluster.wait_gone(kind, name, job_delete_timeout, sleep)
                cluster.create(res)
                actions.append(Action(kind, name, "replaced"))
                continue
            actions.append(Action(kind, name, cluster.apply(res)))
    return actions


def down(cluster: Cluster, *, keep_data: bool = False, instance: str | None = None) -> list[Action]:
    """Delete every fedq resource of the namespace, or only those of one federation (instance),
    and Redis' volume and Secret unless keep_data."""
    selector = SELECTOR if instance is None else instance_selector(instance)
    actions: list[Action] = []
    with api_errors(f"namespace {cluster.namespace}"):
        cluster.check_namespace()
        for kind in _DOWN_KINDS:
            if keep_data and kind in ("Secret", "PersistentVolumeClaim"):
                continue
            for obj in cluster.list(kind, selector):
                name = obj.metadata.name
                if cluster.delete(kind, name):
                    actions.append(Action(kind, name, "deleted"))
    return actions


@dataclass
class Status:
    run_id: str | None
    clients: int | None
    pods: list[dict[str, Any]]
    jobs: list[dict[str, Any]]
    run: dict[str, str] | None  # the run's state hash from Redis, when it could be read


def pod_rows(pods: list[Any]) -> list[dict[str, Any]]:
    rows = []
    for p in sorted(pods, key=lambda p: p.metadata.name):
        statuses = (p.status.container_statuses or []) if p.status else []
        rows.append({
            "name": p.metadata.name,
            "component": (p.metadata.labels or {}).get("app.kubernetes.io/component", ""),
            "phase": (p.status.phase if p.status else None) or "Unknown",
            "ready": f"{sum(1 for s in statuses if s.ready)}/{len(p.spec.containers) if p.spec else 0}",
            "restarts": sum(s.restart_count or 0 for s in statuses),
        })
    return rows


def job_rows(jobs: list[Any]) -> list[dict[str, Any]]:
    return [{"name": j.metadata.name, "completions": j.spec.completions, "succeeded": j.status.succeeded or 0,
             "active": j.status.active or 0, "failed": j.status.failed or 0}
            for j in sorted(jobs, key=lambda j: j.metadata.name)]


def status(cluster: Cluster, read_run: Callable[[str], dict[str, str] | None], instance: str | None = None) -> Status:
    """Pods and Jobs of the namespace's fedq federations, or of one (instance), and the run of its
    ConfigMap (the default federation's without instance) as read_run(run_id) returns it."""
    selector = SELECTOR if instance is None else instance_selector(instance)
    with api_errors(f"namespace {cluster.namespace}"):
        cluster.check_namespace()
        data = cluster.config_data(CONFIG_MAP if instance is None else Federation(instance=instance).config_map)
        pods = pod_rows(cluster.list("Pod", selector))
        jobs = job_rows(cluster.list("Job", selector))
    run_id = data.get("FEDQ_RUN_ID")
    clients = int(data["FEDQ_CLIENTS"]) if data.get("FEDQ_CLIENTS", "").isdigit() else None
    return Status(run_id, clients, pods, jobs, read_run(run_id) if run_id else None)


def exec_run_reader(cluster: Cluster, instance: str = NAME) -> Callable[[str], dict[str, str] | None]:
    """Read a run's state with redis-cli inside the federation's Redis pod (Redis is not reachable
    from outside)."""
    pod = f"{Federation(instance=instance).redis_service}-0"  # the StatefulSet's first pod

    def read(run_id: str) -> dict[str, str] | None:
        from kubernetes.stream import stream

        from fedq.protocol.keys import RunKeys, check_run_id

        key = RunKeys(check_run_id(run_id)).state  # checked: it goes into a shell command
        command = ["sh", "-c", redis_cli_command(f"--raw HGETALL '{key}'")]
        try:
            out = stream(cluster._apis["CoreV1Api"].connect_get_namespaced_pod_exec, pod,
                         cluster.namespace, command=command, container="redis",
                         stderr=False, stdin=False, stdout=True, tty=False)
        except Exception:  # no Redis pod yet, or exec not allowed: the pods table still helps
            return None
        lines = str(out).splitlines()
        return dict(zip(lines[0::2], lines[1::2])) if lines else {}
    return read


def redis_cli_command(args: str) -> str:
    """A shell command running redis-cli ARGS in the Redis container, whichever way it was deployed:
    with the password Secret (REDIS_PASSWORD), or with ACL users and/or TLS (redis-cli's options in
    REDIS_CLI_ARGS, the password in REDISCLI_AUTH)."""
    return ('[ -n "$REDISCLI_AUTH" ] || export REDISCLI_AUTH="$REDIS_PASSWORD"; '
            f"redis-cli $REDIS_CLI_ARGS {args}")


def redis_run_reader(redis_url: str) -> Callable[[str], dict[str, str] | None]:
    """Read a run's state from a Redis the caller reaches (e.g. through kubectl port-forward)."""
    def read(run_id: str) -> dict[str, str] | None:
        from fedq.protocol.connection import connect
        from fedq.protocol.store import RunStore
        from fedq.settings import Settings

        return RunStore(connect(Settings.from_env(redis_url=redis_url)), run_id).state()
    return read
