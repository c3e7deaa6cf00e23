"""Who may do what: `fedq keys new` (update signing keys) and `fedq acl` (Redis ACL users)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from fedq.clitools import fail_cleanly
from fedq.errors import ConfigError


@click.group("keys")
def keys_group() -> None:
    """Signing keys for signed updates."""


@keys_group.command("new")
@click.option("--clients", type=click.IntRange(1), required=True, help="Number of clients (ids client-0..N-1).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for the private keys and the public registry.")
@click.option("--namespace", help="Namespace of the printed Kubernetes Secrets.")
@click.option("--max-examples", type=click.IntRange(1), default=None,
              help="Provision each client's largest sample count per update (edit client-keys.json's "
                   "\"limits\" for per-client values); an update claiming more is refused.")
@fail_cleanly
def keys_new(clients: int, out: Path, namespace: str | None, max_examples: int | None) -> None:
    """Make an Ed25519 key per client; write them and print them as Kubernetes Secrets.

    Give each client its own <id>.key (FEDQ_SIGNING_KEY) and the aggregator client-keys.json
    (FEDQ_CLIENT_KEYS); the aggregator then refuses any update without a valid signature."""
    from fedq.protocol.signing import new_keys, secrets_yaml

    private, registry = new_keys([f"client-{k}" for k in range(clients)], max_examples)
    out.mkdir(parents=True, exist_ok=True)
    for cid, pem in private.items():
        path = out / f"{cid}.key"
        path.write_bytes(pem)
        path.chmod(0o600)
    (out / "client-keys.json").write_text(json.dumps(registry, indent=2))
    click.echo(secrets_yaml(private, registry, namespace), nl=False)


@click.command("acl")
@click.option("--clients", type=int, help="Clients client-0 .. client-<N-1>.")
@click.option("--client-ids", help="Comma-separated client ids (instead of --clients).")
@click.option("--run", "run_id", default="*", show_default=True, help="Confine clients to this run ('*': any run).")
@click.option("--format", "fmt", type=click.Choice(["aclfile", "commands"]), default="aclfile", show_default=True,
              help="aclfile: lines for redis-server --aclfile (password digests only); commands: ACL SETUSER "
                   "commands for redis-cli (plain passwords).")
@click.option("--passwords", type=click.Path(dir_okay=False, path_type=Path),
              help="user=password file: passwords in it are reused, new ones are added (mode 0600).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Write a directory for deployments instead of printing: users.acl, passwords.env "
                   "(the --passwords file) and <user>.password, one per user (see README, Deploying).")
@fail_cleanly
def acl_cmd(clients: int | None, client_ids: str | None, run_id: str, fmt: str, passwords: Path | None,
            out: Path | None) -> None:
    """Print Redis ACL users for the aggregator, the dashboard and each client.

    Least privilege by key pattern: a client writes only fedq:{run}:c:<its id>:* (and may add
    itself to the run and ring the inbox); the aggregator owns fedq and rq keys; the dashboard
    only reads. Each process then connects as its user: FEDQ_REDIS_URL=redis://<user>:<password>@host,
    or FEDQ_REDIS_USERNAME=<user> with FEDQ_REDIS_PASSWORD_FILE=<a file holding the password>."""
    from fedq.ops import acl

    if client_ids:
        ids = [c.strip() for c in client_ids.split(",") if c.strip()]
    else:
        ids = [f"client-{k}" for k in range(clients or 0)]
    if not ids:
        raise ConfigError("give at least one client (--clients N or --client-ids a,b)")
    if out is not None:
        if passwords is not None or fmt != "aclfile":
            raise ConfigError("--out writes its own passwords file and ACL file: leave out --passwords and --format")
        passwords = out / acl.PASSWORDS_FILE
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is not a directory")
    known = acl.parse_passwords(passwords.read_text()) if passwords is not None and passwords.exists() else {}
    users = acl.users(ids, run_id, known)
    if fmt == "aclfile" and passwords is None:
        raise ConfigError("--format aclfile prints only password digests: give --passwords FILE to keep the passwords")
    if out is not None:
        for path in acl.write_dir(out, users):
            click.echo(str(path))
        return
    if passwords is not None:
        passwords.touch(mode=0o600)
        passwords.chmod(0o600)
        passwords.write_text(acl.passwords_text(users))
    if fmt == "aclfile":
        click.echo(acl.aclfile(users), nl=False)
    else:
        # The default user goes off last: redis-cli may be connected as it while applying these.
        click.echo("\n".join([*(u.setuser() for u in users), "ACL SETUSER default off"]))
