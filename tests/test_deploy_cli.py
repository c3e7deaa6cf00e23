"""`fedq k8s up/status/down` through the kubernetes client's own request objects, the commands'
bad input as real processes (one 'error:' line, exit 1), the KFP compile, and the image's files.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from click.testing import CliRunner
from deploy_api import Recorder, api_client, collection_path, config_map_obj, namespace_obj
from deploy_harness import ROOT, cli_env, fedq_cmd, free_port, image_stages, parse_fedq, read_image

from fedq.ops import k8s as k8s_cli
from fedq.ops.k8s_apply import Cluster, down, status, to_model, up
from fedq.ops.k8s_federation import Federation
from fedq.ops.k8s_manifests import build
from fedq.roles.runner import with_malloc_tunables

NS = "fl"
TIMEOUT = 120
KFP_PYTHON = ROOT / "build" / "kfp-venv" / "bin" / "python"


def _cluster(rec: Recorder, namespace: str = NS) -> Cluster:
    return Cluster(api_client(rec), namespace)


def _fed(**kw: Any) -> Federation:
    return Federation(**{"clients": 3, "rounds": 2, "image": "registry.example.com/fedq:1.0", "run_id": "run-a", **kw})


def _path(resource: dict[str, Any]) -> str:
    return f"{collection_path(resource['kind'], NS)}"


# --- fedq k8s up -------------------------------------------------------------------------------
@pytest.mark.slow
def test_up_creates_every_resource_with_the_clients_own_request_objects() -> None:
    from kubernetes import client

    rec = Recorder().on("GET", f"/api/v1/namespaces/{NS}", 200, namespace_obj(NS))
    actions = up(_cluster(rec), _fed(redis_password="secret-pass-1", dashboard_token="dashboard-token-0123"))
    expected = build(_fed(namespace=NS, redis_password="secret-pass-1", dashboard_token="dashboard-token-0123"))

    posts = [c for c in rec.calls if c.method == "POST"]
    assert [(c.path, c.body["kind"], c.body["metadata"]["name"]) for c in posts] == \
        [(_path(r), r["kind"], r["metadata"]["name"]) for r in expected]
    api = client.ApiClient()
    for call, resource in zip(posts, expected):
        # What went over the wire is our resource, field for field, after the client's own
        # model of the kind took it in and serialised it back out.
        assert call.body == resource
        assert api.sanitize_for_serialization(to_model(call.body)) == resource
        assert call.query.get("fieldManager") == ["fedq"]
    assert str(actions[0]) == "secret/fedq-redis created"
    assert all(a.action == "created" for a in actions[1:])
    # Before creating anything: the namespace, the run configured so far, the Secret, the Jobs.
    assert rec.paths("GET")[:3] == [("GET", f"/api/v1/namespaces/{NS}"),
                                    ("GET", f"/api/v1/namespaces/{NS}/configmaps/fedq-config"),
                                    ("GET", f"/api/v1/namespaces/{NS}/secrets/fedq-redis")]


def test_up_again_patches_what_exists_keeps_the_secret_and_this_runs_jobs() -> None:
    rec = Recorder().on("GET", f"/api/v1/namespaces/{NS}", 200, namespace_obj(NS))
    rec.on("GET", f"/api/v1/namespaces/{NS}/configmaps/fedq-config", 200,
           config_map_obj(NS, {"FEDQ_RUN_ID": "run-a"}))
    rec.on("GET", f"/api/v1/namespaces/{NS}/secrets/fedq-redis", 200,
           {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "fedq-redis"}, "data": {"password": "eA=="}})
    rec.on("GET", f"/api/v1/namespaces/{NS}/secrets/fedq-dashboard-auth", 200,
           {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "fedq-dashboard-auth"},
            "data": {"token": "eA=="}})
    for job in ("fedq-submit", "fedq-clients"):
        rec.on("GET", f"/apis/batch/v1/namespaces/{NS}/jobs/{job}", 200,
               {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": job}})
    for r in build(_fed(namespace=NS)):
        if r["kind"] != "Job":
            rec.on("POST", _path(r), 409)
    actions = {str(a) for a in up(_cluster(rec), _fed())}
    assert {"secret/fedq-redis kept", "secret/fedq-dashboard-auth kept"} <= actions
    assert {"job/fedq-submit kept", "job/fedq-clients kept"} <= actions
    assert "deployment/fedq-aggregator configured" in actions
    patches = [c for c in rec.calls if c.method == "PATCH"]
    assert {c.body["kind"] for c in patches} == {"ConfigMap", "Service", "StatefulSet", "NetworkPolicy", "Deployment"}
    assert all(c.content_type == "application/strategic-merge-patch+json" for c in patches)
    assert not any(c.path.endswith("/secrets") for c in rec.calls if c.method in ("POST", "PATCH"))
    assert not any("/jobs" in c.path for c in rec.calls if c.method in ("POST", "PATCH", "DELETE"))


def test_up_with_a_new_run_replaces_the_previous_runs_jobs() -> None:
    rec = Recorder().on("GET", f"/api/v1/namespaces/{NS}", 200, namespace_obj(NS))
    rec.on("GET", f"/api/v1/namespaces/{NS}/configmaps/fedq-config", 200, config_map_obj(NS, {"FEDQ_RUN_ID": "old"}))
    job_path = f"/apis/batch/v1/namespaces/{NS}/jobs/fedq-clients"
    found = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "fedq-clients"}}
    rec.on("GET", job_path, 200, found).on("GET", job_path, 200, found).on("GET", job_path, 404)
    actions = {str(a) for a in up(_cluster(rec), _fed(run_id="new"), sleep=lambda s: None)}
    assert "job/fedq-clients replaced" in actions
    delete = next(c for c in rec.calls if c.method == "DELETE")
    assert delete.path == job_path and delete.query.get("propagationPolicy") == ["Background"]
    i = rec.calls.index(delete)
    assert [c.method for c in rec.calls[i + 1:i + 4]] == ["GET", "GET", "POST"]  # gone, then created anew


def test_up_with_acl_users_and_tls_applies_their_secrets_and_no_password_secret() -> None:
    from fedq.ops.k8s_apply import ClusterError

    passwords = {"fedq-aggregator": "agg-pass-1", "fedq-dashboard": "dash-pass-1",
                 **{f"client-{k}": f"client-pass-{k}" for k in range(3)}}
    fed = _fed(acl=True, acl_passwords=passwords, tls_secret="my-tls")
    rec = Recorder().on("GET", f"/api/v1/namespaces/{NS}", 200, namespace_obj(NS))
    rec.on("GET", f"/api/v1/namespaces/{NS}/secrets/my-tls", 200,
           {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "my-tls"}, "type": "kubernetes.io/tls"})
    actions = [str(a) for a in up(_cluster(rec), fed)]
    posts = [c.body for c in rec.calls if c.method == "POST"]
    # The dashboard's token Secret first (made up: none was given), then the federation.
    assert posts[0]["metadata"]["name"] == "fedq-dashboard-auth" and len(posts[0]["data"]["token"]) > 20
    assert posts[1:] == build(replace(fed, namespace=NS))
    assert actions[:3] == ["secret/fedq-dashboard-auth created", "secret/fedq-redis-acl created",
                           "secret/fedq-redis-users created"]
    assert ("GET", f"/api/v1/namespaces/{NS}/secrets/fedq-redis") not in rec.paths("GET")
    assert not any(c.body["metadata"]["name"] in ("fedq-redis", "my-tls") for c in rec.calls
                   if c.method == "POST" and c.body["kind"] == "Secret")
    # The TLS Secret is the user's: without it, nothing is applied.
    rec = Recorder().on("GET", f"/api/v1/namespaces/{NS}", 200, namespace_obj(NS))
    with pytest.raises(ClusterError, match="no Secret my-tls"):
        up(_cluster(rec), fed)
    assert not rec.paths("POST")


def test_up_refuses_a_namespace_that_does_not_exist() -> None:
    from fedq.ops.k8s_apply import ClusterError

    rec = Recorder()  # GET namespace: 404
    with pytest.raises(ClusterError, match="namespace fl does not exist"):
        up(_cluster(rec), _fed())
    assert rec.paths() == [("GET", f"/api/v1/namespaces/{NS}")]


def test_up_reports_a_refusal_of_the_api_server_in_one_line() -> None:
    from fedq.ops.k8s_apply import ClusterError

    rec = Recorder().on("GET", f"/api/v1/namespaces/{NS}", 200, namespace_obj(NS))
    rec.on("POST", f"/api/v1/namespaces/{NS}/configmaps", 403)
    with pytest.raises(ClusterError) as info:
        up(_cluster(rec), _fed())
    assert "403 Forbidden" in str(info.value) and "\n" not in str(info.value)


# --- status and down -----------------------------------------------------------------------------
def _pod(name: str, component: str, phase: str, ready: bool, restarts: int = 0) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/component": component}},
            "spec": {"containers": [{"name": component, "image": "fedq:latest"}]},
            "status": {"phase": phase, "containerStatuses": [
                {"name": component, "ready": ready, "restartCount": restarts, "image": "fedq:latest",
                 "imageID": "", "state": {}}]}}


def _status_recorder() -> Recorder:
    rec = Recorder().on("GET", f"/api/v1/namespaces/{NS}", 200, namespace_obj(NS))
    rec.on("GET", f"/api/v1/namespaces/{NS}/configmaps/fedq-config", 200,
           config_map_obj(NS, {"FEDQ_RUN_ID": "k8s-run", "FEDQ_CLIENTS": "2"}))
    rec.on("GET", f"/api/v1/namespaces/{NS}/pods", 200, {"apiVersion": "v1", "kind": "PodList", "items": [
        _pod("fedq-redis-0", "redis", "Running", True),
        _pod("fedq-aggregator-7d9f-abcde", "aggregator", "Running", True, 1),
        _pod("fedq-clients-0-xyz", "client", "Running", True),
        _pod("fedq-clients-1-xyz", "client", "Pending", False)]})
    rec.on("GET", f"/apis/batch/v1/namespaces/{NS}/jobs", 200, {"apiVersion": "batch/v1", "kind": "JobList", "items": [
        {"metadata": {"name": "fedq-clients"}, "spec": {"completions": 2, "template": {}},
         "status": {"active": 2}}]})
    return rec


def test_status_shows_pods_jobs_and_the_runs_progress_read_from_redis(redis_url: str, r: redis.Redis,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from fedq.learning.spec import RunSpec
    from fedq.protocol.store import RunStore

    RunStore(r, "k8s-run").create(RunSpec(clients=2, rounds=3, run_id="k8s-run"))
    r.hset("fedq:{k8s-run}:state", mapping={"status": "running", "round": 1})
    rec = _status_recorder()
    monkeypatch.setattr(k8s_cli, "_kube", lambda *a: _cluster(rec))
    result = CliRunner().invoke(k8s_cli.k8s_group, ["status", "--redis-url", redis_url])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "namespace fl"
    rows = [line.split()[:5] for line in lines]
    assert ["fedq-clients-1-xyz", "client", "Pending", "0/1", "0"] in rows, lines
    assert ["fedq-aggregator-7d9f-abcde", "aggregator", "Running", "1/1", "1"] in rows, lines
    assert "job/fedq-clients: 0/2 succeeded, 2 active, 0 failed" in lines
    assert lines[-1] == "run k8s-run: running, round 1/3"
    assert [p for _, p in rec.paths()] == [
        f"/api/v1/namespaces/{NS}", f"/api/v1/namespaces/{NS}/configmaps/fedq-config",
        f"/api/v1/namespaces/{NS}/pods", f"/apis/batch/v1/namespaces/{NS}/jobs"]
    assert all(c.query.get("labelSelector") == ["app.kubernetes.io/part-of=fedq"] for c in rec.calls[2:])


def test_status_of_one_instance_reads_its_own_config_and_selects_its_own_pods(redis_url: str, r: redis.Redis,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from fedq.learning.spec import RunSpec
    from fedq.protocol.store import RunStore

    RunStore(r, "team-b-run").create(RunSpec(clients=2, rounds=4, run_id="team-b-run"))
    r.hset("fedq:{team-b-run}:state", mapping={"status": "running", "round": 3})
    rec = Recorder().on("GET", f"/api/v1/namespaces/{NS}", 200, namespace_obj(NS))
    rec.on("GET", f"/api/v1/namespaces/{NS}/configmaps/team-b-config", 200,
           config_map_obj(NS, {"FEDQ_RUN_ID": "team-b-run", "FEDQ_CLIENTS": "2"}))
    rec.on("GET", f"/api/v1/namespaces/{NS}/pods", 200, {"apiVersion": "v1", "kind": "PodList", "items": [
        _pod("team-b-aggregator-5c6d-fghij", "aggregator", "Running", True)]})
    rec.on("GET", f"/apis/batch/v1/namespaces/{NS}/jobs", 200, {"apiVersion": "batch/v1", "kind": "JobList",
                                                               "items": []})
    monkeypatch.setattr(k8s_cli, "_kube", lambda *a: _cluster(rec))
    result = CliRunner().invoke(k8s_cli.k8s_group, ["status", "--instance", "team-b", "--redis-url", redis_url])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert ["team-b-aggregator-5c6d-fghij", "aggregator", "Running", "1/1", "0"] in [x.split()[:5] for x in lines]
    assert lines[-1] == "run team-b-run: running, round 3/4"
    # Its own ConfigMap, and only its own pods and Jobs: another federation may share the namespace.
    assert f"/api/v1/namespaces/{NS}/configmaps/fedq-config" not in [p for _, p in rec.paths()]
    lists = [c for c in rec.calls if c.path.endswith(("/pods", "/jobs"))]
    assert len(lists) == 2 and all(c.query.get("labelSelector") == [
        "app.kubernetes.io/part-of=fedq,app.kubernetes.io/instance=team-b"] for c in lists)

    bad = CliRunner().invoke(k8s_cli.k8s_group, ["status", "--instance", "Team_B"])
    assert bad.exit_code == 1 and "--instance 'Team_B' is not a valid name" in bad.output


def test_status_without_a_readable_redis_still_lists_the_pods() -> None:
    st = status(_cluster(_status_recorder()), lambda run_id: None)
    assert st.run_id == "k8s-run" and len(st.pods) == 4 and st.run is None
    assert k8s_cli._run_line(st.run_id, st.run) == "run k8s-run: progress unknown (Redis not readable yet)"


def test_down_deletes_what_carries_fedqs_label_and_keeps_data_on_request() -> None:
    KINDS = ("Job", "Deployment", "StatefulSet", "Service", "NetworkPolicy", "ConfigMap", "Secret",
             "PersistentVolumeClaim")

    def recorder() -> Recorder:
        rec = Recorder().on("GET", f"/api/v1/namespaces/{NS}", 200, namespace_obj(NS))
        objects = build(_fed(namespace=NS, redis_password="secret-pass-1")) + [
            {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data-fedq-redis-0"},
             "spec": {"accessModes": ["ReadWriteOnce"]}}]
        for kind in KINDS:
            rec.on("GET", collection_path(kind, NS), 200, {"items": [o for o in objects if o["kind"] == kind]})
        return rec

    rec = recorder()
    actions = [str(a) for a in down(_cluster(rec))]
    assert actions == ["job/fedq-submit deleted", "job/fedq-clients deleted", "deployment/fedq-aggregator deleted",
                       "deployment/fedq-dashboard deleted", "statefulset/fedq-redis deleted",
                       "service/fedq-redis deleted", "service/fedq-aggregator-metrics deleted",
                       "service/fedq-dashboard deleted",
                       "networkpolicy/fedq-redis deleted", "configmap/fedq-config deleted",
                       "secret/fedq-redis deleted", "persistentvolumeclaim/data-fedq-redis-0 deleted"]
    deletes = [c for c in rec.calls if c.method == "DELETE"]
    assert deletes[0].path == f"/apis/batch/v1/namespaces/{NS}/jobs/fedq-submit"
    assert all(c.query.get("propagationPolicy") == ["Background"] for c in deletes)
    lists = [c for c in rec.calls if c.method == "GET" and c.query]
    assert all(c.query["labelSelector"] == ["app.kubernetes.io/part-of=fedq"] for c in lists)

    kept = [str(a) for a in down(_cluster(recorder()), keep_data=True)]
    assert kept == actions[:-2]


def test_the_cli_prints_a_missing_namespace_as_one_error_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(k8s_cli, "_kube", lambda *a: _cluster(Recorder(), "nowhere"))
    for command in (["up", "--run-id", "x1"], ["status"], ["down"]):
        result = CliRunner().invoke(k8s_cli.k8s_group, command)
        assert result.exit_code == 1
        assert result.output.strip().splitlines() == [
            "error: namespace nowhere does not exist; create it first "
            "(kubectl create namespace nowhere) or pass --namespace"]


# --- bad input, as real processes ---------------------------------------------------------------
def _fedq(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fedq_cmd(*args), env=cli_env(None, **env), capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def _one_error_line(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    detail = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, detail
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), detail
    for needle in needles:
        assert needle in lines[0], detail
    return lines[0]


def _kubeconfig(path: Path, server: str, namespace: str | None = None) -> Path:
    context: dict[str, Any] = {"cluster": "c", "user": "u"}
    if namespace:
        context["namespace"] = namespace
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "contexts": [{"name": "c", "context": context}],
        "users": [{"name": "u", "user": {"token": "t"}}]}))
    return path


@pytest.mark.slow
def test_bad_input_is_one_clear_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    _one_error_line(_fedq("k8s", "manifest", "--clients", "0"), "--clients must be at least 1, got 0")
    _one_error_line(_fedq("k8s", "manifest", "--rounds", "-1"), "--rounds")
    _one_error_line(_fedq("k8s", "manifest", "--image", "Fedq Image:latest"), "is not a container image reference")
    _one_error_line(_fedq("k8s", "manifest", "--image", "fedq:"), "--image 'fedq:'")
    _one_error_line(_fedq("k8s", "manifest", "--namespace", "Team_A"), "not a valid Kubernetes namespace")
    _one_error_line(_fedq("k8s", "manifest", "--run-id", "a:b"), "invalid run id")
    _one_error_line(_fedq("k8s", "up", HOME=str(home)), "no kubeconfig")
    _one_error_line(_fedq("k8s", "status", "--kubeconfig", str(tmp_path / "missing"), HOME=str(home)),
                    "no kubeconfig at")
    _one_error_line(_fedq("k8s", "down", HOME=str(home), KUBECONFIG=str(tmp_path / "missing")), "kubeconfig")
    (tmp_path / "garbage").write_text("{{{ not yaml")
    _one_error_line(_fedq("k8s", "up", "--kubeconfig", str(tmp_path / "garbage"), HOME=str(home)), "kubeconfig")
    closed = _kubeconfig(tmp_path / "kubeconfig", f"https://127.0.0.1:{free_port()}")
    _one_error_line(_fedq("k8s", "up", "--kubeconfig", str(closed), "-n", "fl", HOME=str(home)),
                    "namespace fl", "cannot reach the Kubernetes API")
    _one_error_line(_fedq("k8s", "up", "--kubeconfig", str(closed), "--clients", "0", HOME=str(home)),
                    "--clients must be at least 1")
    _one_error_line(_fedq("k8s", "up", "--kubeconfig", str(closed), "--image", "UPPER/case", HOME=str(home)),
                    "is not a container image reference")
    _one_error_line(_fedq("k8s", "status", "--kubeconfig", str(closed), "--context", "other", HOME=str(home)),
                    "no context 'other'")


def test_the_kubeconfig_contexts_namespace_is_the_default(tmp_path: Path) -> None:
    cfg = _kubeconfig(tmp_path / "kubeconfig", f"https://127.0.0.1:{free_port()}", namespace="team-a")
    cluster = k8s_cli._kube(str(cfg), None, None)
    assert cluster.namespace == "team-a"
    assert k8s_cli._kube(str(cfg), None, "other").namespace == "other"


def test_manifest_prints_resources_that_kubectl_would_apply() -> None:
    done = _fedq("k8s", "manifest", "--clients", "4", "--rounds", "3", "--image", "fedq:0.1.0", "--namespace", "fl")
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert [d["kind"] for d in docs][:3] == ["Secret", "Secret", "ConfigMap"]
    clients = next(d for d in docs if d["metadata"]["name"] == "fedq-clients")
    assert clients["spec"]["completions"] == clients["spec"]["parallelism"] == 4
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert (config["FEDQ_CLIENTS"], config["FEDQ_ROUNDS"]) == ("4", "3")
    assert {d["metadata"]["namespace"] for d in docs} == {"fl"}
    images = {c["image"] for d in docs if d["kind"] in ("Deployment", "Job")
              for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {"fedq:0.1.0"}


@pytest.mark.slow
def test_submit_if_absent_lets_a_rerun_of_the_submit_job_succeed(redis_url: str, r: redis.Redis) -> None:
    args = ("submit", "--clients", "2", "--rounds", "1", "--run-id", "once-only")
    first = subprocess.run(fedq_cmd(*args, "--if-absent"), env=cli_env(redis_url), capture_output=True,
                           text=True, timeout=TIMEOUT)
    assert first.returncode == 0 and first.stdout.strip() == "once-only", first.stderr
    again = subprocess.run(fedq_cmd(*args, "--if-absent"), env=cli_env(redis_url), capture_output=True,
                           text=True, timeout=TIMEOUT)
    assert again.returncode == 0 and again.stdout.strip() == "once-only", again.stderr
    assert r.llen("rq:queue:fedq-runs") == 1, "the run was enqueued once"
    plain = subprocess.run(fedq_cmd(*args), env=cli_env(redis_url), capture_output=True, text=True, timeout=TIMEOUT)
    assert plain.returncode == 1 and "already exists" in plain.stderr  # without the flag: as before


# --- Kubeflow Pipelines -----------------------------------------------------------------------------
@pytest.mark.slow
def test_kfp_compile_without_kfp_says_how_to_get_it() -> None:
    try:
        import kfp  # noqa: F401
        pytest.skip("kfp is installed in this environment")
    except ImportError:
        pass
    _one_error_line(_fedq("kfp", "compile", "--clients", "2"), "pip install 'fedq[kfp]'")
    _one_error_line(_fedq("kfp", "compile", "--clients", "0"), "--clients must be at least 1")


def _placeholders(text: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        text = text.replace(f"{{{{$.inputs.parameters['{name}']}}}}", value)
    return text


@pytest.mark.skipif(not KFP_PYTHON.exists(), reason="no kfp environment: .ci/run builds build/kfp-venv with "
                    "pip install -e '.[kfp]' (kfp pins old kubernetes and requests, so not in .venv)")
def test_kfp_pipeline_compiles_offline_with_an_aggregator_and_n_clients(tmp_path: Path) -> None:
    out = tmp_path / "pipeline.yaml"
    env = cli_env(None, HOME=str(tmp_path))
    done = subprocess.run([str(KFP_PYTHON), "-m", "fedq", "kfp", "compile", "--clients", "3", "--rounds", "4",
                           "--local-epochs", "2", "--image", "registry.example.com/fedq:0.1.0", "-o", str(out)],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    # The pipeline spec, then kfp-kubernetes' platform spec (the Redis Secret's mounts).
    spec = next(yaml.safe_load_all(out.read_text()))
    assert spec["pipelineInfo"]["name"] == "fedq-federation"
    root = spec["root"]
    params = root["inputDefinitions"]["parameters"]
    assert params["redis_url"]["parameterType"] == "STRING" and "defaultValue" not in params["redis_url"]
    assert params["rounds"]["defaultValue"] == 4 and params["local_epochs"]["defaultValue"] == 2
    outputs = root["outputDefinitions"]
    assert set(outputs["parameters"]) == {"test_accuracy", "test_loss"} and "report" in outputs["artifacts"]
    tasks = root["dag"]["tasks"]
    by_name = {t["taskInfo"]["name"]: t for t in tasks.values()}
    assert set(by_name) == {"aggregator", "client-0", "client-1", "client-2", "report"}
    assert sorted(by_name["report"]["dependentTasks"]) == sorted(
        k for k, t in tasks.items() if t["taskInfo"]["name"] != "report")

    # Every task's command, with its parameters filled in, parses with fedq's own CLI.
    executors = spec["deploymentSpec"]["executors"]
    values = {"redis_url": "redis://127.0.0.1:6379/0", "run_id": "kfp-run", "clients": "3", "rounds": "4",
              "local_epochs": "2", "shard": "1"}
    roles = []
    for ex in executors.values():
        c = ex["container"]
        assert c["image"] == "registry.example.com/fedq:0.1.0"
        if c["command"] == ["fedq"]:
            argv = ["fedq", *(_placeholders(a, values) for a in c["args"])]
        else:  # the report task: sh -c SCRIPT with the fedq line in it
            assert c["command"][:2] == ["sh", "-c"]
            args = [_placeholders(a, values) for a in c["args"]]
            line = next(line for line in c["command"][2].splitlines() if line.startswith("fedq "))
            for i, a in enumerate(args, start=1):
                line = line.replace(f'"${i}"', shlex.quote(a))
            argv = shlex.split(line)
        roles.append(parse_fedq(argv)[0])
    assert sorted(roles) == ["aggregator", "client", "client", "client", "report"]


# --- the image --------------------------------------------------------------------------------------
ROLES = {"dashboard": "dashboard.txt", "aggregator": "aggregator.txt", "gpu": "client-gpu.txt", "full": "full.txt"}


def test_image_definition() -> None:
    args, stages = image_stages()
    assert args == {"ROLE": "full"}, "the default image has every role"
    assert {name.removeprefix("deps-") for name in stages if name.startswith("deps-")} == set(ROLES)
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert ignored[0] == "*", ".dockerignore lets in only what the image needs"
    # fedq's code goes in as a wheel built in a stage of its own, so no role's dependencies wait on it.
    assert [rest for word, rest in stages["code"][1] if word == "RUN"] == [
        "pip wheel --no-deps --wheel-dir dist . && rm -rf build fedq.egg-info"]
    for role, requirements in ROLES.items():
        image = read_image(role=role)
        # The base is pinned by digest, its tag beside it for people.
        assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+@sha256:[0-9a-f]{64}", image.base), image.base
        assert image.entrypoint == ["fedq"]
        assert image.user is not None and image.user.split(":")[0] not in ("0", "root")
        assert image.healthcheck and image.healthcheck[0] == "python"
        assert image.env.get("HOME") == "/tmp"
        # fedq's processes in the image allocate as fedq run starts them (huge pages, pages kept)
        assert image.env.get("GLIBC_TUNABLES") == with_malloc_tunables({})["GLIBC_TUNABLES"]
        # The role's dependencies from its file under the constraints, in a stage without the
        # code; then fedq's wheel, without dependencies.
        deps = stages[f"deps-{role}"][1]
        assert [rest for word, rest in deps if word == "RUN"] == [
            f"pip install -c requirements/constraints.txt -r requirements/{requirements}"], role
        assert not any(word == "COPY" for word, _ in deps), role
        assert image.runs[-1] == "pip install --no-cache-dir --no-deps dist/*.whl", role
        for sources, _ in image.copies:
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
                assert any(f"{src.rstrip('/')}/".startswith(p[1:].rstrip("/") + "/") for p in ignored
                           if p.startswith("!")), f"COPY {src}: excluded by .dockerignore"
        # The health check script is the one the image copies.
        script = image.healthcheck[1]
        assert any(dest.rstrip("/").endswith(script.split("/app/", 1)[1]) or dest == script
                   for _, dest in image.copies), script
    # The README's install stays `pip install .`; the full image installs the same dependencies.
    assert "pip install . && fedq run" in (ROOT / "README.md").read_text()


def test_image_health_check_reaches_redis_or_fails(redis_url: str) -> None:
    script = ROOT / "workers" / "healthcheck.py"
    ok = subprocess.run([sys.executable, str(script)], env=cli_env(redis_url), capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0, ok.stderr
    down_url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    bad = subprocess.run([sys.executable, str(script)], env=cli_env(down_url), capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 1 and bad.stderr.startswith("unhealthy: cannot reach Redis")
    assert "secret" not in bad.stderr  # the password is redacted


def test_readme_documents_deploying() -> None:
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))])
    for needle in ("docker build -f workers/Dockerfile", "docker compose up", "kubectl apply -k deploy/overlays/dev",
                   "fedq k8s up", "fedq kfp compile"):
        assert needle in text, needle
