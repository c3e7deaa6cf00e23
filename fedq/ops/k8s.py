"""``fedq k8s`` and ``fedq kfp``: deploy a federation to Kubernetes, or compile it for Kubeflow Pipelines.

The click code of both groups lives here; resources come from ``fedq.ops.k8s_manifests`` (the source
of ``deploy/base``), cluster calls from ``fedq.ops.k8s_apply``, the pipeline from ``fedq.ops.kfp_pipeline``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from fedq.clitools import fail_cleanly
from fedq.errors import ConfigError
from fedq.ops import k8s_sites_cli
from fedq.ops.k8s_federation import DEFAULT_IMAGE, Federation, check_namespace
from fedq.ops.k8s_manifests import build
from fedq.ops.k8s_overlays import to_yaml, write_base, write_secure_overlay


def _federation_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    # Plain ints, checked by Federation.validate, so that a bad count is one 'error:' line.
    for opt in reversed([
        click.option("--clients", type=int, default=2, show_default=True, help="Client pods (N), shards 0..N-1."),
        click.option("--rounds", type=int, default=5, show_default=True, help="Federated rounds."),
        click.option("--local-epochs", type=int, default=5, show_default=True, help="Local epochs per round."),
        click.option("--image", default=DEFAULT_IMAGE, show_default=True,
                     help="The fedq image (docker build -f workers/Dockerfile)."),
        click.option("--run-id", help="Id of the run the Jobs create and join (default: time + random)."),
        click.option("--instance", default="fedq", show_default=True,
                     help="The federation's name: prefixes every resource and labels it "
                          "(app.kubernetes.io/instance), so that two federations share a namespace."),
    ]):
        fn = opt(fn)
    return fn


def _secure_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed([
        click.option("--acl-passwords", type=click.Path(dir_okay=False, exists=True, path_type=Path),
                     help="ACL users per role: the passwords file of `fedq acl --out DIR` (DIR/passwords.env). "
                          "Redis loads their digests; each pod connects as its own user."),
        click.option("--tls-secret", help="TLS: an existing Secret with ca.crt, tls.crt and tls.key "
                                          "(e.g. fedq-redis-tls); Redis then serves TLS only."),
    ]):
        fn = opt(fn)
    return fn


def _read_secret_file(path: Path | None, what: str) -> str | None:
    """A secret from a file (first line, stripped): secrets are never command-line arguments."""
    if path is None:
        return None
    try:
        value = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not value or "\n" in value:
        raise ConfigError(f"{what} file {path} must hold one line (it is {'empty' if not value else 'several'})")
    return value


def _secret_file_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed([
        click.option("--redis-password-file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
                     help="File holding the Redis password of a new Secret (default: a new random one)."),
        click.option("--dashboard-token-file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
                     help="File holding the dashboard's access token of a new Secret (default: a new random one)."),
    ]):
        fn = opt(fn)
    return fn


def _read_acl_passwords(path: Path | None) -> dict[str, str] | None:
    if path is None:
        return None
    from fedq.ops.acl import parse_passwords

    try:
        return parse_passwords(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None


def _federation(clients: int, rounds: int, local_epochs: int, image: str, run_id: str | None,
                namespace: str | None, redis_password: str | None = None,
                acl_passwords: dict[str, str] | None = None, tls_secret: str | None = None,
                instance: str = "fedq", dashboard_token: str | None = None) -> Federation:
    from fedq.learning.spec import new_run_id

    return Federation(clients=clients, rounds=rounds, local_epochs=local_epochs, image=image,
                      namespace=namespace, run_id=run_id or new_run_id(), redis_password=redis_password,
                      acl=acl_passwords is not None, acl_passwords=acl_passwords, tls_secret=tls_secret,
                      instance=instance, dashboard_token=dashboard_token).validate()


# --- cluster access --------------------------------------------------------------------------
def _kube(kubeconfig: str | None, context: str | None, namespace: str | None) -> Any:
    """A Cluster for the namespace (default: the context's, else 'default') of the current kubeconfig."""
    import yaml
    from kubernetes import client, config

    from fedq.ops.k8s_apply import Cluster

    # urllib3 logs each retry as a warning; the one error line at the end says all of it.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    default_file = Path("~/.kube/config").expanduser()
    try:
        if kubeconfig is None and not os.environ.get("KUBECONFIG") and not default_file.exists():
            if not os.environ.get("KUBERNETES_SERVICE_HOST"):
                raise ConfigError("no kubeconfig: ~/.kube/config does not exist and KUBECONFIG is not set "
                                  "(pass --kubeconfig FILE)")
            config.load_incluster_config()  # fedq k8s started in a pod, with its service account
            return Cluster(client.ApiClient(), check_namespace(namespace or _incluster_namespace()))
        if kubeconfig is not None and not Path(kubeconfig).is_file():
            raise ConfigError(f"no kubeconfig at {kubeconfig}")
        contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
        if context is not None:
            active = next((c for c in contexts if c["name"] == context), None)
            if active is None:
                raise ConfigError(f"no context {context!r} in the kubeconfig")
        ns_default = (active or {}).get("context", {}).get("namespace") or "default"
        api_client = config.new_client_from_config(config_file=kubeconfig, context=context)
    except config.ConfigException as exc:
        raise ConfigError(f"kubeconfig: {' '.join(str(exc).split())}") from None
    except (ValueError, TypeError, KeyError, OSError, yaml.YAMLError) as exc:  # a malformed kubeconfig
        raise ConfigError(f"kubeconfig unreadable: {' '.join(str(exc).split())}") from None
    return Cluster(api_client, check_namespace(namespace or ns_default))


def _incluster_namespace() -> str:
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return path.read_text().strip() if path.exists() else "default"


def _cluster_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed([
        click.option("--namespace", "-n", help="Namespace (default: the kubeconfig context's, else 'default')."),
        click.option("--kubeconfig", type=click.Path(dir_okay=False),
                     help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)."),
        click.option("--context", help="kubeconfig context (default: the current one)."),
    ]):
        fn = opt(fn)
    return fn


# --- fedq k8s --------------------------------------------------------------------------------
@click.group("k8s")
def k8s_group() -> None:
    """Deploy a federation to Kubernetes (the resources of deploy/, applied through the API)."""


@k8s_group.command("manifest")
@_federation_options
@click.option("--namespace", help="Namespace of every resource (default: none, kubectl's current one).")
@_secret_file_options
@click.option("--no-secret", is_flag=True, help="Leave the Secrets out (they exist already); with "
                                               "--acl-passwords, the ACL Secrets (the file is only checked).")
@click.option("--service-monitor", is_flag=True,
              help="Add a ServiceMonitor of the aggregators' /metrics (needs the Prometheus Operator's CRD).")
@_secure_options
@fail_cleanly(squash=True)
def manifest(clients: int, rounds: int, local_epochs: int, image: str, run_id: str | None, instance: str,
             namespace: str | None, redis_password_file: Path | None, dashboard_token_file: Path | None,
             no_secret: bool, service_monitor: bool, acl_passwords: Path | None, tls_secret: str | None) -> None:
    """Print the federation's resources as YAML (for kubectl apply -f -)."""
    from dataclasses import replace

    from fedq.ops.k8s_apply import new_password

    passwords = _read_acl_passwords(acl_passwords)
    redis_password = _read_secret_file(redis_password_file, "Redis password")
    if passwords is not None and redis_password is not None:
        raise ConfigError("--redis-password-file and --acl-passwords exclude each other (ACL users have their own)")
    password = None if no_secret or passwords is not None else (redis_password or new_password())
    token = None if no_secret else (_read_secret_file(dashboard_token_file, "dashboard token") or new_password())
    fed = _federation(clients, rounds, local_epochs, image, run_id, namespace, password, passwords, tls_secret,
                      instance, token)
    if no_secret:
        fed = replace(fed, acl_passwords=None)  # checked above, left out here
    click.echo(to_yaml(build(fed, service_monitor_too=service_monitor)), nl=False)


@k8s_group.command("up")
@_federation_options
@_cluster_options
@_secret_file_options
@_secure_options
@fail_cleanly(squash=True)
def up(clients: int, rounds: int, local_epochs: int, image: str, run_id: str | None, instance: str,
       namespace: str | None, kubeconfig: str | None, context: str | None, redis_password_file: Path | None,
       dashboard_token_file: Path | None, acl_passwords: Path | None, tls_secret: str | None) -> None:
    """Create or update the federation in the cluster of the current kubeconfig (an existing
    Secret is kept; a new run's Jobs replace the finished ones of the last)."""
    from fedq.ops.k8s_apply import up as apply_up

    passwords = _read_acl_passwords(acl_passwords)
    redis_password = _read_secret_file(redis_password_file, "Redis password")
    if passwords is not None and redis_password is not None:
        raise ConfigError("--redis-password-file and --acl-passwords exclude each other (ACL users have their own)")
    fed = _federation(clients, rounds, local_epochs, image, run_id, None, redis_password, passwords, tls_secret,
                      instance, _read_secret_file(dashboard_token_file, "dashboard token"))
    cluster = _kube(kubeconfig, context, namespace)
    for action in apply_up(cluster, fed):
        click.echo(str(action))
    click.echo(f"run {fed.run_id}: {fed.clients} clients, {fed.rounds} rounds in namespace {cluster.namespace}; "
               f"follow it with: fedq k8s status -n {cluster.namespace}"
               + ("" if instance == "fedq" else f" --instance {instance}"))


@k8s_group.command("status")
@_cluster_options
@click.option("--redis-url", help="Read the run from this Redis (e.g. a kubectl port-forward) "
                                  "instead of through redis-cli in the Redis pod.")
@click.option("--instance", help="Only this federation (app.kubernetes.io/instance) and its run "
                                 "(default: every fedq pod and Job here, and the run of fedq-config).")
@fail_cleanly(squash=True)
def status(namespace: str | None, kubeconfig: str | None, context: str | None, redis_url: str | None,
           instance: str | None) -> None:
    """Show the federation's pods and Jobs and its run's progress."""
    from fedq.ops.k8s_apply import exec_run_reader, redis_run_reader
    from fedq.ops.k8s_apply import status as read_status

    if instance is not None:
        Federation(instance=instance).validate()  # a bad name is one error line, before any call
    cluster = _kube(kubeconfig, context, namespace)
    reader = redis_run_reader(redis_url) if redis_url else exec_run_reader(cluster, instance or "fedq")
    st = read_status(cluster, reader, instance)
    click.echo(f"namespace {cluster.namespace}")
    if not st.pods and not st.jobs and st.run_id is None:
        click.echo("no fedq resources here (fedq k8s up deploys them)")
        return
    click.echo(f"{'POD':<40} {'COMPONENT':<11} {'PHASE':<10} {'READY':<6} RESTARTS")
    for p in st.pods:
        click.echo(f"{p['name']:<40} {p['component']:<11} {p['phase']:<10} {p['ready']:<6} {p['restarts']}")
    for j in st.jobs:
        click.echo(f"job/{j['name']}: {j['succeeded']}/{j['completions']} succeeded, "
                   f"{j['active']} active, {j['failed']} failed")
    click.echo(_run_line(st.run_id, st.run))


def _run_line(run_id: str | None, state: dict[str, str] | None) -> str:
    if run_id is None:
        return "run: none configured"
    if state is None:
        return f"run {run_id}: progress unknown (Redis not readable yet)"
    if not state:
        return f"run {run_id}: not created yet"
    line = f"run {run_id}: {state.get('status', '?')}, round {state.get('round', '0')}/{state.get('rounds', '?')}"
    if state.get("final"):
        import json

        try:
            final = json.loads(state["final"])
            line += f", final test accuracy {final['test_accuracy']:.3f}"
        except (ValueError, KeyError, TypeError):
            pass
    if state.get("reason"):
        line += f" ({state['reason']})"
    return line


@k8s_group.command("down")
@_cluster_options
@click.option("--keep-data", is_flag=True, help="Keep Redis' volume and password Secret.")
@click.option("--instance", help="Only this federation's resources (default: every fedq federation here).")
@fail_cleanly(squash=True)
def down(namespace: str | None, kubeconfig: str | None, context: str | None, keep_data: bool,
         instance: str | None) -> None:
    """Delete the federation's resources from the namespace."""
    from fedq.ops.k8s_apply import down as apply_down

    cluster = _kube(kubeconfig, context, namespace)
    actions = apply_down(cluster, keep_data=keep_data, instance=instance)
    for action in actions:
        click.echo(str(action))
    if not actions:
        click.echo(f"nothing of fedq in namespace {cluster.namespace}")


@k8s_group.command("base")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@fail_cleanly(squash=True)
def base(directory: Path) -> None:
    """Write the kustomize base (deploy/base) from fedq's resource definitions."""
    try:
        for path in write_base(directory):
            click.echo(str(path))
    except OSError as exc:
        raise ConfigError(f"cannot write {directory}: {exc.strerror or exc}") from None


@k8s_group.command("secure-overlay")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@fail_cleanly(squash=True)
def secure_overlay(directory: Path) -> None:
    """Write the kustomize overlay of ACL users and TLS (deploy/overlays/secure) over deploy/base."""
    try:
        for path in write_secure_overlay(directory):
            click.echo(str(path))
    except OSError as exc:
        raise ConfigError(f"cannot write {directory}: {exc.strerror or exc}") from None


for _command in k8s_sites_cli.COMMANDS:
    k8s_group.add_command(_command)


# --- fedq kfp --------------------------------------------------------------------------------
@click.group("kfp")
def kfp_group() -> None:
    """Kubeflow Pipelines: compile a federation into a KFP v2 pipeline (needs fedq[kfp])."""


@kfp_group.command("compile")
@click.option("--clients", type=int, default=2, show_default=True, help="Client tasks (N), shards 0..N-1.")
@click.option("--rounds", type=int, default=5, show_default=True, help="Default of the rounds parameter.")
@click.option("--local-epochs", type=int, default=5, show_default=True, help="Default of the local_epochs parameter.")
@click.option("--image", default=DEFAULT_IMAGE, show_default=True, help="The fedq image every task runs.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("pipeline.yaml"),
              show_default=True, help="Pipeline file to write.")
@fail_cleanly(squash=True)
def kfp_compile(clients: int, rounds: int, local_epochs: int, image: str, output: Path) -> None:
    """Compile a pipeline: an aggregator task and N client tasks against a Redis URL parameter."""
    Federation(clients=clients, rounds=rounds, local_epochs=local_epochs, image=image).validate()
    try:
        from fedq.ops.kfp_pipeline import compile_pipeline
    except ImportError as exc:
        raise ConfigError(f"fedq kfp needs the kfp package ({exc.name or exc}): pip install 'fedq[kfp]'") from None
    try:
        compile_pipeline(clients=clients, rounds=rounds, local_epochs=local_epochs, image=image, output=output)
    except OSError as exc:
        raise ConfigError(f"cannot write {output}: {exc.strerror or exc}") from None
    click.echo(str(output))
