"""Building blocks of a federation's pods: labels and metadata, resources and security contexts,
how a pod reaches Redis (env, secret volumes), fedq's containers and pods, a Job's lifecycle.
Used by fedq.ops.k8s_manifests and by the hub and site resources (k8s_hub, k8s_site).
"""

from __future__ import annotations

from typing import Any

from fedq import __version__ as fedq_version
from fedq.ops.k8s_federation import (
    COMPLETION_INDEX_FIELD,
    COMPONENT,
    FEDQ_AUTH_DIR,
    FEDQ_PASSWORD_FILE,
    FEDQ_TLS_DIR,
    FEDQ_UID,
    INSTANCE,
    JOB_TTL_SECONDS,
    MANAGED_BY,
    MANAGER,
    NAME,
    PART_OF,
    REDIS_PORT,
    TLS_KEYS,
    VERSION,
    Federation,
)


def _labels(fed: Federation, component: str) -> dict[str, str]:
    """The recommended labels: which app, which federation (instance), which part, which version."""
    return {"app.kubernetes.io/name": NAME, INSTANCE: fed.instance, COMPONENT: component, PART_OF: NAME,
            VERSION: fedq_version, MANAGED_BY: MANAGER}


def _selector(fed: Federation, component: str) -> dict[str, str]:
    """What a Service or workload selects: never the version (selectors are immutable)."""
    return {"app.kubernetes.io/name": NAME, INSTANCE: fed.instance, COMPONENT: component}


def _meta(fed: Federation, suffix: str, component: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": fed.name(suffix), "labels": _labels(fed, component)}
    if annotations:
        meta["annotations"] = annotations
    return meta


def _resources(cpu_request: str, memory_request: str, cpu_limit: str, memory_limit: str) -> dict[str, Any]:
    return {"requests": {"cpu": cpu_request, "memory": memory_request},
            "limits": {"cpu": cpu_limit, "memory": memory_limit}}


def _container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]}}


def _pod_security(uid: int, gid: int) -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": gid, "fsGroup": gid,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _redis_env(fed: Federation, user: str | None) -> list[dict[str, Any]]:
    """How a fedq container reaches Redis: the Service's URL without credentials, the password
    from a mounted file (the Secret's, or with ACL users its own user's); with TLS, rediss://."""
    scheme = "rediss" if fed.tls_secret else "redis"
    env: list[dict[str, Any]] = []
    if fed.acl and user is None:
        # A client pod's user is client-<its index>. The Job controller appends its own
        # JOB_COMPLETION_INDEX after the container's variables, too late for $(...) in them:
        # defined here first (from the same annotation), the controller leaves it be.
        env.append({"name": "JOB_COMPLETION_INDEX",
                    "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX_FIELD}}})
    env.append({"name": "FEDQ_REDIS_URL", "value": f"{scheme}://{fed.redis_service}:{REDIS_PORT}/0"})
    if fed.acl:
        env.append({"name": "FEDQ_REDIS_USERNAME", "value": user or "client-$(JOB_COMPLETION_INDEX)"})
    env.append({"name": "FEDQ_REDIS_PASSWORD_FILE", "value": FEDQ_PASSWORD_FILE})
    if fed.tls_secret:
        env += [{"name": "FEDQ_TLS_CA_CERT", "value": f"{FEDQ_TLS_DIR}/ca.crt"},
                {"name": "FEDQ_TLS_CERT", "value": f"{FEDQ_TLS_DIR}/tls.crt"},
                {"name": "FEDQ_TLS_KEY", "value": f"{FEDQ_TLS_DIR}/tls.key"}]
    return env


def _secret_volume(name: str, secret: str, items: list[str] | None = None,
                   paths: list[str] | None = None) -> dict[str, Any]:
    source: dict[str, Any] = {"secretName": secret}
    if items is not None:
        source["items"] = [{"key": k, "path": p} for k, p in zip(items, paths or items)]
    # Read by the pod's group only (fsGroup owns the files).
    source["defaultMode"] = 0o440
    return {"name": name, "secret": source}


def _redis_volumes(fed: Federation, user: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts) of a fedq pod for its Redis credentials and TLS files."""
    volumes, mounts = [], []
    if not fed.acl:
        volumes.append(_secret_volume("redis-auth", fed.redis_secret, ["password"]))
        mounts.append({"name": "redis-auth", "mountPath": FEDQ_AUTH_DIR, "readOnly": True})
    elif user is None:
        # Every client's password, each pod mounting just its own key as the password file.
        volumes.append(_secret_volume("redis-auth", fed.users_secret, fed.client_users))
        mounts.append({"name": "redis-auth", "mountPath": FEDQ_PASSWORD_FILE,
                       "subPathExpr": "client-$(JOB_COMPLETION_INDEX)", "readOnly": True})
    else:
        volumes.append(_secret_volume("redis-auth", fed.users_secret, [user], ["password"]))
        mounts.append({"name": "redis-auth", "mountPath": FEDQ_AUTH_DIR, "readOnly": True})
    if fed.tls_secret:
        volumes.append(_secret_volume("redis-tls", fed.tls_secret, list(TLS_KEYS)))
        mounts.append({"name": "redis-tls", "mountPath": FEDQ_TLS_DIR, "readOnly": True})
    return volumes, mounts


def _fedq_container(name: str, image: str, args: list[str], resources: dict[str, Any],
                    fed: Federation | None = None, user: str | None = None) -> dict[str, Any]:
    """A container of the fedq image: the image's entrypoint is ``fedq``, so args name the role.

    user is its Redis ACL user when fed.acl is on (None: a client pod, client-<index>)."""
    fed = fed or Federation()
    return {
        "name": name,
        "image": image,
        "args": args,
        "envFrom": [{"configMapRef": {"name": fed.config_map}}],
        "env": [
            *_redis_env(fed, user),
            # The root filesystem is read-only: Keras and TensorFlow write under $HOME and /tmp.
            {"name": "HOME", "value": "/tmp"},
        ],
        "resources": resources,
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, *_redis_volumes(fed, user)[1]],
    }


def _fedq_pod(component: str, containers: list[dict[str, Any]], restart: str | None = None,
              fed: Federation | None = None, user: str | None = None,
              annotations: dict[str, str] | None = None,
              extra_volumes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    fed = fed or Federation()
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": _pod_security(FEDQ_UID, FEDQ_UID),
        "containers": containers,
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
                    *_redis_volumes(fed, user)[0], *(extra_volumes or [])],
    }
    if restart:
        spec = {"restartPolicy": restart, **spec}
    metadata: dict[str, Any] = {"labels": _labels(fed, component)}
    if annotations:
        metadata["annotations"] = annotations
    return {"metadata": metadata, "spec": spec}


def _job_lifecycle(deadline: int) -> dict[str, Any]:
    """A finished Job is removed after a day (a new run's Jobs do not collide with it), and a Job
    that runs longer than its deadline is stopped with its pods."""
    return {"ttlSecondsAfterFinished": JOB_TTL_SECONDS, "activeDeadlineSeconds": deadline}
