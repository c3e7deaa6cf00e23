"""Checks of rendered Kubernetes resources that schema validation lets through.

kubernetes-validate checks shapes and field names, but not enum values (a Job's restartPolicy
'Always' or 'Sometimes', completionMode 'Indexd'), nor whether names refer to each other
(a Secret that is not there, a Service selecting no pod), nor fedq's own rules (pod security,
resources, one client per shard). ``problems`` returns one line per finding.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

Doc = dict[str, Any]

KNOWN_KINDS = {
    ("v1", "Namespace"), ("v1", "ConfigMap"), ("v1", "Secret"), ("v1", "Service"),
    ("v1", "PersistentVolumeClaim"), ("apps/v1", "Deployment"), ("apps/v1", "StatefulSet"),
    ("batch/v1", "Job"), ("networking.k8s.io/v1", "NetworkPolicy"),
}
WORKLOADS = ("Deployment", "StatefulSet", "Job")
ENUMS = {
    "restartPolicy": {"Always", "OnFailure", "Never"},
    "completionMode": {"NonIndexed", "Indexed"},
    "imagePullPolicy": {"Always", "IfNotPresent", "Never"},
    "protocol": {"TCP", "UDP", "SCTP"},
    "serviceType": {"ClusterIP", "NodePort", "LoadBalancer", "ExternalName"},
    "policyTypes": {"Ingress", "Egress"},
    "accessModes": {"ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"},
    "podManagementPolicy": {"OrderedReady", "Parallel"},
    "seccompProfile": {"RuntimeDefault", "Localhost", "Unconfined"},
    "secretType": {"Opaque", "kubernetes.io/basic-auth", "kubernetes.io/tls", "kubernetes.io/ssh-auth",
                   "kubernetes.io/dockerconfigjson", "kubernetes.io/service-account-token"},
}
_VAR_REF = re.compile(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")


def kn(doc: Doc) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def pod_spec(doc: Doc) -> dict[str, Any] | None:
    return doc["spec"]["template"]["spec"] if doc.get("kind") in WORKLOADS else None


def pod_labels(doc: Doc) -> dict[str, str]:
    return doc["spec"]["template"].get("metadata", {}).get("labels", {}) if doc.get("kind") in WORKLOADS else {}


def containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from spec.get("initContainers", [])
    yield from spec.get("containers", [])


def is_fedq_image(image: str) -> bool:
    """fedq's own image, whatever registry and tag an overlay gave it."""
    return image.rsplit("/", 1)[-1].split("@")[0].split(":")[0] == "fedq"


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def problems(docs: list[Doc]) -> list[str]:
    """Every finding in a rendered set of resources (empty when there is none)."""
    out: list[str] = []
    seen: set[tuple[str, str, str | None]] = set()
    by_kind: dict[str, dict[str, Doc]] = {}
    for d in docs:
        if (d.get("apiVersion"), d.get("kind")) not in KNOWN_KINDS:
            out.append(f"{kn(d)}: unknown kind {d.get('apiVersion')}/{d.get('kind')}")
            continue
        key = (d["kind"], d["metadata"]["name"], d["metadata"].get("namespace"))
        if key in seen:
            out.append(f"{kn(d)}: defined twice")
        seen.add(key)
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    configmaps, secrets = by_kind.get("ConfigMap", {}), by_kind.get("Secret", {})
    pvcs, services = by_kind.get("PersistentVolumeClaim", {}), by_kind.get("Service", {})
    workloads = [d for k in WORKLOADS for d in by_kind.get(k, {}).values()]

    for s in secrets.values():
        if s.get("type", "Opaque") not in ENUMS["secretType"]:
            out.append(f"{kn(s)}: type {s.get('type')!r} is not one of {sorted(ENUMS['secretType'])}")
    for p in pvcs.values():
        out += _check_access_modes(kn(p), p["spec"])
    for d in workloads:
        out += _check_workload(d, configmaps, secrets, pvcs)
    for s in services.values():
        out += _check_service(s, workloads)
    for sts in by_kind.get("StatefulSet", {}).values():
        if sts["spec"].get("serviceName") not in services:
            out.append(f"{kn(sts)}: serviceName {sts['spec'].get('serviceName')!r} is no Service here")
        if sts["spec"].get("podManagementPolicy", "OrderedReady") not in ENUMS["podManagementPolicy"]:
            out.append(f"{kn(sts)}: podManagementPolicy {sts['spec']['podManagementPolicy']!r}")
        for t in sts["spec"].get("volumeClaimTemplates", []):
            out += _check_access_modes(f"{kn(sts)} volumeClaimTemplate {t['metadata']['name']}", t["spec"])
    for np in by_kind.get("NetworkPolicy", {}).values():
        out += _check_network_policy(np, workloads)
    out += _check_federation(by_kind)
    return out


def _check_access_modes(where: str, spec: dict[str, Any]) -> list[str]:
    modes = spec.get("accessModes", [])
    bad = [m for m in modes if m not in ENUMS["accessModes"]]
    return [f"{where}: accessModes {bad} not in {sorted(ENUMS['accessModes'])}"] if bad or not modes else []


def _check_workload(d: Doc, configmaps: dict[str, Doc], secrets: dict[str, Doc], pvcs: dict[str, Doc]) -> list[str]:
    out: list[str] = []
    spec = pod_spec(d)
    assert spec is not None
    where = kn(d)
    restart = spec.get("restartPolicy", "Always")
    if restart not in ENUMS["restartPolicy"]:
        out.append(f"{where}: restartPolicy {restart!r} is not one of {sorted(ENUMS['restartPolicy'])}")
    elif d["kind"] == "Job" and restart == "Always":
        out.append(f"{where}: a Job's restartPolicy must be OnFailure or Never, not Always")
    elif d["kind"] != "Job" and restart != "Always":
        out.append(f"{where}: a {d['kind']}'s restartPolicy must be Always, not {restart}")
    if d["kind"] == "Job":
        js = d["spec"]
        mode = js.get("completionMode", "NonIndexed")
        if mode not in ENUMS["completionMode"]:
            out.append(f"{where}: completionMode {mode!r} is not one of {sorted(ENUMS['completionMode'])}")
        if mode == "Indexed" and not isinstance(js.get("completions"), int):
            out.append(f"{where}: an Indexed Job needs an integer completions")
        if isinstance(js.get("completions"), int) and js.get("parallelism", 1) > js["completions"]:
            out.append(f"{where}: parallelism exceeds completions")
    else:
        selector = d["spec"].get("selector", {}).get("matchLabels", {})
        if not _selects(selector, pod_labels(d)):
            out.append(f"{where}: selector {selector} does not match the pod template's labels")
    if not pod_labels(d).get("app.kubernetes.io/part-of"):
        out.append(f"{where}: pods lack the app.kubernetes.io/part-of label")

    psc = spec.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True:
        out.append(f"{where}: the pod does not set runAsNonRoot: true")
    if psc.get("seccompProfile", {}).get("type") not in ENUMS["seccompProfile"]:
        out.append(f"{where}: seccompProfile type {psc.get('seccompProfile')!r}")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for t in d["spec"].get("volumeClaimTemplates", []):
        volumes[t["metadata"]["name"]] = {"name": t["metadata"]["name"], "persistentVolumeClaim": {}}
    for v in spec.get("volumes", []):
        claim = v.get("persistentVolumeClaim", {}).get("claimName")
        if claim is not None and claim not in pvcs:
            out.append(f"{where}: volume {v['name']} claims {claim!r}, which is no PersistentVolumeClaim here")
        cm = v.get("configMap", {}).get("name")
        if cm is not None and cm not in configmaps:
            out.append(f"{where}: volume {v['name']} uses ConfigMap {cm!r}, which is not here")
        out += _check_secret_volume(where, v, secrets)
    indexed = d["kind"] == "Job" and d["spec"].get("completionMode") == "Indexed"
    names: set[str] = set()
    for c in containers(spec):
        out += _check_container(f"{where} container {c.get('name')}", c, configmaps, secrets, volumes, indexed)
        out += _check_sub_paths(f"{where} container {c.get('name')}", c, volumes, secrets,
                                d["spec"].get("completions", 1) if indexed else None)
        if c.get("name") in names:
            out.append(f"{where}: two containers named {c.get('name')}")
        names.add(c.get("name"))
    return out


def _secret_paths(v: dict[str, Any], secrets: dict[str, Doc]) -> set[str] | None:
    """The files a Secret volume holds (None when it is no Secret volume, or the Secret is not here)."""
    source = v.get("secret")
    if source is None or source.get("secretName") not in secrets:
        return None
    items = source.get("items")
    return {i["path"] for i in items} if items else set(secrets[source["secretName"]].get("data", {}))


def _check_secret_volume(where: str, v: dict[str, Any], secrets: dict[str, Doc]) -> list[str]:
    source = v.get("secret")
    if source is None:
        return []
    secret = secrets.get(source.get("secretName"))
    if secret is None:
        return [f"{where}: volume {v['name']} uses Secret {source.get('secretName')!r}, which is not here"]
    keys = set(secret.get("data", {})) | set(secret.get("stringData", {}))
    return [f"{where}: volume {v['name']} takes key {i['key']!r} that Secret {source['secretName']} lacks"
            for i in source.get("items", []) if i["key"] not in keys]


def _check_sub_paths(where: str, c: dict[str, Any], volumes: dict[str, Any], secrets: dict[str, Doc],
                     completions: int | None) -> list[str]:
    """A subPath must be a file of its Secret volume; a subPathExpr of an Indexed Job's pod
    (client-$(JOB_COMPLETION_INDEX)) must name one for every index."""
    out = []
    for m in c.get("volumeMounts", []):
        paths = _secret_paths(volumes.get(m["name"], {}), secrets)
        if paths is None:
            continue
        if "subPath" in m and m["subPath"] not in paths:
            out.append(f"{where}: mount {m['mountPath']} takes {m['subPath']!r}, which its volume lacks")
        if "subPathExpr" in m:
            variables = set(_VAR_REF.findall(m["subPathExpr"]))
            if variables != {"JOB_COMPLETION_INDEX"} or completions is None:
                out.append(f"{where}: mount {m['mountPath']}'s subPathExpr {m['subPathExpr']!r} is not "
                           "one file per index of an Indexed Job")
                continue
            missing = [k for k in range(completions)
                       if m["subPathExpr"].replace("$(JOB_COMPLETION_INDEX)", str(k)) not in paths]
            if missing:
                out.append(f"{where}: mount {m['mountPath']} has no file for the pods of index {missing}")
    return out


def _check_container(where: str, c: dict[str, Any], configmaps: dict[str, Doc], secrets: dict[str, Doc],
                     volumes: dict[str, Any], indexed: bool) -> list[str]:
    out: list[str] = []
    if c.get("imagePullPolicy", "IfNotPresent") not in ENUMS["imagePullPolicy"]:
        out.append(f"{where}: imagePullPolicy {c['imagePullPolicy']!r}")
    port_names = set()
    for p in c.get("ports", []):
        if p.get("protocol", "TCP") not in ENUMS["protocol"]:
            out.append(f"{where}: port protocol {p['protocol']!r}")
        if "name" in p:
            port_names.add(p["name"])
    for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe = c.get(probe_name) or {}
        for handler in ("tcpSocket", "httpGet"):
            port = (probe.get(handler) or {}).get("port")
            if isinstance(port, str) and port not in port_names:
                out.append(f"{where}: {probe_name} uses port {port!r}, which the container does not name")
    sc = c.get("securityContext", {})
    if sc.get("allowPrivilegeEscalation") is not False:
        out.append(f"{where}: allowPrivilegeEscalation is not false")
    if sc.get("readOnlyRootFilesystem") is not True:
        out.append(f"{where}: the root filesystem is not read-only")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []):
        out.append(f"{where}: capabilities are not all dropped")
    res = c.get("resources", {})
    for part in ("requests", "limits"):
        for what in ("cpu", "memory"):
            q = str(res.get(part, {}).get(what, ""))
            if not _QUANTITY.match(q):
                out.append(f"{where}: no valid {what} {part[:-1]} ({q!r})")

    defined: set[str] = set()
    for src in c.get("envFrom", []):
        if "configMapRef" in src:
            cm = configmaps.get(src["configMapRef"]["name"])
            if cm is None:
                out.append(f"{where}: envFrom ConfigMap {src['configMapRef']['name']!r} is not here")
            else:
                defined |= {src.get("prefix", "") + k for k in cm.get("data", {})}
        if "secretRef" in src:
            s = secrets.get(src["secretRef"]["name"])
            if s is None:
                out.append(f"{where}: envFrom Secret {src['secretRef']['name']!r} is not here")
            else:
                defined |= {src.get("prefix", "") + k for k in s.get("data", {})}
    if indexed:
        defined.add("JOB_COMPLETION_INDEX")  # the Job controller sets it in every pod of an Indexed Job
    for e in c.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            s = secrets.get(ref["name"])
            if s is None:
                out.append(f"{where}: env {e['name']} uses Secret {ref['name']!r}, which is not here")
            elif ref["key"] not in s.get("data", {}) and ref["key"] not in s.get("stringData", {}):
                out.append(f"{where}: env {e['name']} uses key {ref['key']!r} that Secret {ref['name']} lacks")
        ref = e.get("valueFrom", {}).get("configMapKeyRef")
        if ref is not None and ref["key"] not in configmaps.get(ref["name"], {}).get("data", {}):
            out.append(f"{where}: env {e['name']} uses {ref['name']}/{ref['key']}, which is not here")
        for var in _VAR_REF.findall(str(e.get("value", ""))):
            if var not in defined:
                out.append(f"{where}: env {e['name']} refers to $({var}), defined neither above it nor by envFrom")
        defined.add(e["name"])
    for arg in [*c.get("command", []), *c.get("args", [])]:
        for var in _VAR_REF.findall(str(arg)):
            if var not in defined:
                out.append(f"{where}: argument {arg!r} refers to $({var}), which the container does not define")
    mounts = set()
    for m in c.get("volumeMounts", []):
        if m["name"] not in volumes:
            out.append(f"{where}: volumeMount {m['name']!r} has no volume")
        mounts.add(m["mountPath"])
    if is_fedq_image(c.get("image", "")):
        # Keras and TensorFlow write under $HOME and /tmp: with a read-only root, /tmp must be a volume.
        if "/tmp" not in mounts:
            out.append(f"{where}: the fedq container has no writable /tmp")
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        if env.get("HOME") not in ("/tmp", None) and not any(str(env.get("HOME")).startswith(m) for m in mounts):
            out.append(f"{where}: HOME {env.get('HOME')!r} is not writable")
    return out


def _check_service(s: Doc, workloads: list[Doc]) -> list[str]:
    spec = s["spec"]
    if spec.get("type", "ClusterIP") not in ENUMS["serviceType"]:
        return [f"{kn(s)}: type {spec['type']!r} is not one of {sorted(ENUMS['serviceType'])}"]
    selected = [w for w in workloads if _selects(spec.get("selector", {}), pod_labels(w))]
    if not selected:
        return [f"{kn(s)}: selector {spec.get('selector')} matches no pod template"]
    out = []
    for p in spec.get("ports", []):
        if p.get("protocol", "TCP") not in ENUMS["protocol"]:
            out.append(f"{kn(s)}: port protocol {p['protocol']!r}")
        target = p.get("targetPort", p["port"])
        ports = [cp for w in selected for c in containers(pod_spec(w) or {}) for cp in c.get("ports", [])]
        if isinstance(target, str) and not any(cp.get("name") == target for cp in ports):
            out.append(f"{kn(s)}: targetPort {target!r} is no named port of the selected pods")
        if isinstance(target, int) and not any(cp.get("containerPort") == target for cp in ports):
            out.append(f"{kn(s)}: targetPort {target} is no port of the selected pods")
    return out


def _check_network_policy(np: Doc, workloads: list[Doc]) -> list[str]:
    spec = np["spec"]
    out = []
    bad = [t for t in spec.get("policyTypes", []) if t not in ENUMS["policyTypes"]]
    if bad:
        out.append(f"{kn(np)}: policyTypes {bad}")
    protected = [w for w in workloads if _selects(spec["podSelector"].get("matchLabels", {}), pod_labels(w))]
    if not protected:
        out.append(f"{kn(np)}: podSelector matches no pods")
    allowed = [peer.get("podSelector", {}).get("matchLabels", {}) for rule in spec.get("ingress", [])
               for peer in rule.get("from", [])]
    for w in workloads:
        if w in protected:
            continue
        uses_fedq = any(is_fedq_image(c.get("image", "")) for c in containers(pod_spec(w) or {}))
        if uses_fedq and not any(_selects(sel, pod_labels(w)) for sel in allowed):
            out.append(f"{kn(np)}: fedq pods of {kn(w)} would be kept from Redis")
        if not uses_fedq and any(_selects(sel, pod_labels(w)) for sel in allowed):
            out.append(f"{kn(np)}: {kn(w)} is not fedq but may reach Redis")
    return out


def _check_federation(by_kind: dict[str, dict[str, Doc]]) -> list[str]:
    """fedq's own consistency: one client pod per client of the run (a hub: one site user per
    client, and no client pod; a site's kit, which has no Redis: nothing to count)."""
    config = by_kind.get("ConfigMap", {}).get("fedq-config", {}).get("data", {})
    if not config and not by_kind.get("StatefulSet"):
        return []
    if not config:
        return ["no fedq-config ConfigMap"]
    clients = int(config.get("FEDQ_CLIENTS", "0"))
    if any(s["spec"].get("type") in ("LoadBalancer", "NodePort") for s in by_kind.get("Service", {}).values()):
        users = by_kind.get("Secret", {}).get("fedq-redis-users", {}).get("data", {})
        sites = [u for u in users if u not in ("fedq-aggregator", "fedq-dashboard")]
        if by_kind.get("Job", {}).get("fedq-clients") or len(sites) != clients:
            return [f"a hub: FEDQ_CLIENTS is {clients}, its site users are {sites}, and no client Job may run here"]
        return []
    pods = 0
    for job in by_kind.get("Job", {}).values():
        spec = pod_spec(job) or {}
        if any(c.get("args", [None])[0] == "client" for c in spec.get("containers", [])):
            pods += job["spec"].get("completions", 1)
            if job["spec"].get("parallelism", 1) != job["spec"].get("completions", 1):
                return [f"{kn(job)}: every client of a round must run at once (parallelism == completions)"]
    if pods != clients:
        return [f"FEDQ_CLIENTS is {clients} but the client Jobs start {pods} pods"]
    return []
