"""The kubernetes client's own ApiClient with its HTTP pool swapped for a recorder.

Everything above the socket is the real client: its typed APIs build the requests, its models
serialise the bodies, its REST layer picks content types and parses answers. The recorder only
writes down each request and answers with the status a test scripts for it (echoing the body back,
as the API server does on create and patch); it keeps no cluster state of its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlparse

import urllib3

HOST = "https://cluster.invalid:6443"


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")


class Recorder:
    """Stands in for urllib3's PoolManager under kubernetes.client.rest.RESTClientObject."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        # (method, path) -> a list of (status, body) answers, used in order (the last one repeats).
        self.script: dict[tuple[str, str], list[tuple[int, Any]]] = {}

    def on(self, method: str, path: str, status: int, body: Any = None) -> Recorder:
        self.script.setdefault((method, path), []).append((status, body))
        return self

    def request(self, method: str, url: str, **kw: Any) -> urllib3.HTTPResponse:
        parsed = urlparse(url)
        raw = kw.get("body")
        body = json.loads(raw) if isinstance(raw, (str, bytes)) and raw else raw
        call = Call(method, parsed.path, parse_qs(parsed.query), dict(kw.get("headers") or {}), body)
        self.calls.append(call)
        answers = self.script.get((method, parsed.path))
        if answers:
            status, answer = answers.pop(0) if len(answers) > 1 else answers[0]
        elif method in ("POST", "PATCH"):
            status, answer = (201 if method == "POST" else 200), None
        elif method == "DELETE":
            status, answer = 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
        else:
            status, answer = 404, None
        if answer is None and status < 400 and method in ("POST", "PATCH"):
            answer = body  # the API server answers with the object
        if status >= 400:
            answer = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": status,
                      "reason": {404: "NotFound", 409: "AlreadyExists", 403: "Forbidden"}.get(status, "Invalid"),
                      "message": f"{parsed.path}: scripted {status}"}
        return urllib3.HTTPResponse(body=json.dumps(answer or {}).encode(), status=status,
                                    reason={200: "OK", 201: "Created", 404: "Not Found", 409: "Conflict",
                                            403: "Forbidden"}.get(status, "Error"),
                                    headers={"Content-Type": "application/json"}, preload_content=False)

    def paths(self, *methods: str) -> list[tuple[str, str]]:
        return [(c.method, c.path) for c in self.calls if not methods or c.method in methods]


def api_client(recorder: Recorder) -> Any:
    """A real kubernetes ApiClient whose HTTP goes to the recorder."""
    from kubernetes import client

    cfg = client.Configuration(host=HOST)
    cfg.retries = 0
    api = client.ApiClient(cfg)
    api.rest_client.pool_manager = recorder
    return api


def namespace_obj(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def config_map_obj(namespace: str, data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "fedq-config", "namespace": namespace},
            "data": data}


def collection_path(kind: str, namespace: str) -> str:
    group = {"Deployment": "/apis/apps/v1", "StatefulSet": "/apis/apps/v1", "Job": "/apis/batch/v1",
             "NetworkPolicy": "/apis/networking.k8s.io/v1"}.get(kind, "/api/v1")
    plural = {"NetworkPolicy": "networkpolicies"}.get(kind, kind.lower() + "s")
    return f"{group}/namespaces/{namespace}/{plural}"
