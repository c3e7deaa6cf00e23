"""One site's kit: the resources a data holder outside the hub's cluster applies in its own
cluster to join the federation (``fedq k8s site NAME --hub HOST:PORT``).

A site runs one client Job whose pod mounts, read-only, its own data volume (``train.csv`` with a
header row and a label column) and its own Secret: its ACL user's password, its certificate and
key, and the hub's CA certificate (the bundle ``fedq k8s hub-secrets`` made under
``DIR/sites/<site>/``). The password reaches the client as a file (``FEDQ_REDIS_PASSWORD_FILE``),
never as an argument or an environment value. The site's whole file is its one shard; its client
keeps the run's test fraction of it aside and reports the final model's accuracy on those rows
as its local validation.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedq.errors import ConfigError
from fedq.ops.k8s_federation import (
    DEFAULT_IMAGE,
    FEDQ_UID,
    JOB_DEADLINE_SECONDS,
    Federation,
    Resource,
    check_image,
    check_namespace,
)
from fedq.ops.k8s_hub import SITE_FILES, SITE_PASSWORD, check_site
from fedq.ops.k8s_manifests import namespaced
from fedq.ops.k8s_pods import (
    _container_security,
    _job_lifecycle,
    _labels,
    _meta,
    _pod_security,
    _resources,
    _secret_volume,
)
from fedq.ops.pki import CA_CERT, CERT, KEY
from fedq.protocol.keys import check_run_id

SITE_DIR = "/etc/fedq/site"
DATA_DIR = "/data"
_HUB_RE = re.compile(r"^(?P<host>[A-Za-z0-9.-]{1,253}|\[[0-9a-fA-F:]+\]):(?P<port>[0-9]{1,5})$")


@dataclass(frozen=True)
class Site:
    """One site's client: who it is, where the hub is, which run, and where its rows are."""

    name: str
    hub: str  # host:port of the hub's Redis (TLS)
    run_id: str | None = None  # None: the newest open run
    image: str = DEFAULT_IMAGE
    namespace: str | None = None
    data_claim: str | None = None  # an existing PersistentVolumeClaim (default: a new one of 1Gi)
    label_column: str = "label"
    # The bundle's files (name -> bytes): when given, the site's Secret is part of the output.
    bundle: Mapping[str, bytes] | None = field(default=None, repr=False)

    @property
    def fed(self) -> Federation:
        """The names and labels of the site's resources (instance fedq-site-<name>)."""
        return Federation(instance=f"fedq-site-{self.name}")

    @property
    def secret(self) -> str:
        return self.fed.name("credentials")

    @property
    def claim(self) -> str:
        return self.data_claim or self.fed.name("data")

    def validate(self) -> Site:
        check_site(self.name)
        found = _HUB_RE.match(self.hub)
        if found is None or not 0 < int(found["port"]) < 65536:
            raise ConfigError(f"--hub {self.hub!r} is not HOST:PORT (the hub's Redis, e.g. hub.example.org:6379)")
        if self.run_id is not None:
            check_run_id(self.run_id)
        check_image(self.image)
        if self.namespace is not None:
            check_namespace(self.namespace)
        if self.data_claim is not None:
            check_namespace(self.data_claim)  # a claim's name is a DNS label too
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", self.label_column):
            raise ConfigError(f"--label-column {self.label_column!r}: use letters, digits, '_', '.', '-'")
        if self.bundle is not None:
            missing = [n for n in SITE_FILES if not self.bundle.get(n)]
            if missing:
                raise ConfigError(f"the site's bundle lacks {', '.join(missing)} (fedq k8s hub-secrets makes it)")
        return self


def read_bundle(directory: Path) -> dict[str, bytes]:
    """A site's bundle directory (password, ca.crt, tls.crt, tls.key) as name -> bytes."""
    out = {}
    for name in SITE_FILES:
        try:
            out[name] = (directory / name).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {directory / name}: {exc.strerror or exc}") from None
    if not out[SITE_PASSWORD].strip() or b"\n" in out[SITE_PASSWORD].strip():
        raise ConfigError(f"{directory / SITE_PASSWORD} must hold one line: the site's password")
    out[SITE_PASSWORD] = out[SITE_PASSWORD].strip()
    return out


def client_env(site: Site) -> list[dict[str, Any]]:
    """The client's settings: the hub over TLS as the site's user, every secret a mounted file."""
    values = {
        "FEDQ_REDIS_URL": f"rediss://{site.hub}/0",
        "FEDQ_REDIS_USERNAME": site.name,
        "FEDQ_REDIS_PASSWORD_FILE": f"{SITE_DIR}/{SITE_PASSWORD}",
        "FEDQ_TLS_CA_CERT": f"{SITE_DIR}/{CA_CERT}",
        "FEDQ_TLS_CERT": f"{SITE_DIR}/{CERT}",
        "FEDQ_TLS_KEY": f"{SITE_DIR}/{KEY}",
        "FEDQ_LOG_LEVEL": "INFO",
        "FEDQ_BLOCK_SECONDS": "1",
        # How long the client waits for a run to open, and for each round.
        "FEDQ_WAIT_SECONDS": "3600",
        "FEDQ_TF_THREADS": "1",
        # The root filesystem is read-only: Keras and TensorFlow write under $HOME and /tmp.
        "HOME": "/tmp",
    }
    return [{"name": k, "value": v} for k, v in values.items()]


def client_args(site: Site) -> list[str]:
    """fedq client with the site's whole file as its one shard, under the site's id."""
    run = ["--run", site.run_id] if site.run_id else []
    return ["client", "--shard", "0", "--num-shards", "1", "--client-id", site.name, *run, "--once",
            "--csv", f"{DATA_DIR}/train.csv", "--label-column", site.label_column]


def client_job(site: Site) -> Resource:
    fed = site.fed
    container = {
        "name": "client", "image": site.image, "args": client_args(site), "env": client_env(site),
        "resources": _resources("500m", "768Mi", "1", "2Gi"), "securityContext": _container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"},
                         {"name": "credentials", "mountPath": SITE_DIR, "readOnly": True},
                         {"name": "data", "mountPath": DATA_DIR, "readOnly": True}],
    }
    pod = {"metadata": {"labels": _labels(fed, "client")},
           "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                    "securityContext": _pod_security(FEDQ_UID, FEDQ_UID), "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
                                _secret_volume("credentials", site.secret, list(SITE_FILES)),
                                {"name": "data",
                                 "persistentVolumeClaim": {"claimName": site.claim, "readOnly": True}}]}}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(fed, "client", "client"),
            "spec": {"backoffLimit": 3, **_job_lifecycle(JOB_DEADLINE_SECONDS), "template": pod}}


def site_resources(site: Site) -> list[Resource]:
    """The site's Secret (with a bundle), its data claim (unless it names one) and its client Job."""
    site.validate()
    fed = site.fed
    out: list[Resource] = []
    if site.bundle is not None:
        out.append({"apiVersion": "v1", "kind": "Secret", "metadata": _meta(fed, "credentials", "client"),
                    "type": "Opaque",
                    "data": {n: base64.b64encode(site.bundle[n]).decode() for n in SITE_FILES}})
    if site.data_claim is None:
        out.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta(fed, "data", "site-data"),
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    out.append(client_job(site))
    return namespaced(out, site.namespace)
