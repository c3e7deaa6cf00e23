"""``fedq k8s hub-overlay``, ``fedq k8s hub-secrets`` and ``fedq k8s site``: a hub in one cluster,
sites outside it (resources in fedq.ops.k8s_hub and fedq.ops.k8s_site)."""

from __future__ import annotations

from pathlib import Path

import click

from fedq.clitools import fail_cleanly
from fedq.errors import ConfigError
from fedq.ops.k8s_federation import DEFAULT_IMAGE
from fedq.ops.k8s_overlays import to_yaml, write_files


def _written(paths: list[Path]) -> None:
    for path in paths:
        click.echo(str(path))


@click.command("hub-overlay")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--site", "sites", multiple=True, help="A site's id (repeat for each; default: site-a and site-b).")
@click.option("--run-id", default="hub-run-1", show_default=True, help="The run the submit Job creates.")
@fail_cleanly(squash=True)
def hub_overlay(directory: Path, sites: tuple[str, ...], run_id: str) -> None:
    """Write the kustomize overlay of a hub for sites outside the cluster (deploy/overlays/hub)."""
    from fedq.ops.k8s_hub import HUB_SITES, hub_overlay_files

    try:
        _written(write_files(directory, hub_overlay_files(sites or HUB_SITES, run_id)))
    except OSError as exc:
        raise ConfigError(f"cannot write {directory}: {exc.strerror or exc}") from None


@click.command("hub-secrets")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--site", "sites", multiple=True, required=True,
              help="A site's id (repeat for each): its ACL user and certificate's name.")
@click.option("--hub-host", "hub_hosts", multiple=True, required=True,
              help="The host name or IP address the sites reach the hub's Redis at (repeatable): "
                   "Redis's certificate must name it.")
@click.option("--namespace", default="fedq-hub", show_default=True,
              help="The hub's namespace (in Redis's certificate).")
@fail_cleanly(squash=True)
def hub_secrets(directory: Path, sites: tuple[str, ...], hub_hosts: tuple[str, ...], namespace: str) -> None:
    """Make the hub's secrets (ACL users, CA, Redis's certificate, dashboard token) and one bundle
    per site in DIRECTORY/sites/<site> (its password, certificate, key and the CA's certificate).

    Run again with the same directory: the CA, the passwords, the token and the sites' certificates
    are kept; a new site gets its user and bundle. Hand each site its bundle only, over a channel
    you trust; keep ca.key off the cluster."""
    from fedq.ops.k8s_hub import write_hub_secrets

    try:
        _written(write_hub_secrets(directory, sites, hub_hosts, namespace))
    except OSError as exc:
        raise ConfigError(f"cannot write {directory}: {exc.strerror or exc}") from None


@click.command("site")
@click.argument("name")
@click.option("--hub", required=True, help="HOST:PORT of the hub's Redis (TLS), as the hub's operator gives it.")
@click.option("--run-id", help="The run to join (default: the newest open run).")
@click.option("--image", default=DEFAULT_IMAGE, show_default=True, help="The fedq image.")
@click.option("--namespace", help="Namespace of every resource (default: none, kubectl's current one).")
@click.option("--bundle", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="The site's bundle from the hub (password, ca.crt, tls.crt, tls.key): its Secret is then "
                   "part of the output (default: a Secret fedq-site-NAME-credentials exists already).")
@click.option("--data-claim", help="An existing PersistentVolumeClaim holding train.csv (default: a new one).")
@click.option("--label-column", default="label", show_default=True, help="Label column of train.csv.")
@fail_cleanly(squash=True)
def site(name: str, hub: str, run_id: str | None, image: str, namespace: str | None, bundle: Path | None,
         data_claim: str | None, label_column: str) -> None:
    """Print one site's resources as YAML: its client Job (its own certificate, ACL user and data
    volume) and, with --bundle, its Secret."""
    from fedq.ops.k8s_site import Site, read_bundle, site_resources

    files = read_bundle(bundle) if bundle is not None else None
    found = Site(name=name, hub=hub, run_id=run_id, image=image, namespace=namespace, data_claim=data_claim,
                 label_column=label_column, bundle=files)
    click.echo(to_yaml(site_resources(found)), nl=False)


COMMANDS = (hub_overlay, hub_secrets, site)
