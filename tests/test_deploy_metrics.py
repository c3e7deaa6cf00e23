"""Metrics wiring: the port the manifests and compose give the aggregator is the one it serves,
and what Prometheus' scrape target (deploy/compose/prometheus.yml) returns parses."""

from __future__ import annotations

import subprocess
import time
import urllib.request

import yaml
from deploy_harness import ROOT, cli_env, compose_argv, compose_services, fedq_cmd, free_port, read_image
from prometheus_client.parser import text_string_to_metric_families

from fedq.ops import k8s_federation, k8s_manifests


def test_manifests_scrape_the_port_the_aggregator_serves() -> None:
    fed = k8s_federation.Federation()
    dep = k8s_manifests.aggregator_deployment(fed)
    pod = dep["spec"]["template"]
    c = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    port = int(env["FEDQ_METRICS_PORT"])
    assert c["ports"] == [{"name": "metrics", "containerPort": port}]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert c["livenessProbe"]["httpGet"]["port"] == "metrics"
    svc = k8s_manifests.aggregator_metrics_service(fed)
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    monitor = k8s_manifests.service_monitor(fed)
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]


def test_compose_prometheus_scrapes_the_aggregator_and_its_output_parses(redis_url: str) -> None:
    services = compose_services({})
    prom = services["prometheus"]
    assert prom["profiles"] == ["metrics"]
    config = yaml.safe_load((ROOT / "deploy" / "compose" / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    host, port = job["static_configs"][0]["targets"][0].split(":")
    assert host in services and str(port) in services[host]["expose"]
    argv = compose_argv(services[host], read_image())
    assert argv[1] == "aggregator" and argv[argv.index("--metrics-port") + 1] == port
    # The aggregator as compose starts it, its metrics port mapped to a free one here.
    local = free_port()
    argv[argv.index("--metrics-port") + 1] = str(local)
    proc = subprocess.Popen(fedq_cmd(*argv[1:]), env=cli_env(redis_url), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{local}{job['metrics_path']}", timeout=5) as resp:
                    text = resp.read().decode()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "no /metrics from the aggregator"
                time.sleep(0.3)
        names = {f.name for f in text_string_to_metric_families(text)}
        assert {"fedq_updates_refused", "fedq_clients_alive"} & names, sorted(names)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
