"""Sites outside the cluster, rendered: deploy/overlays/hub, `fedq k8s site` and docker-compose.site.yml.

Each is validated (kubernetes-validate --strict, our own checks, fedq's CLI parser for every
command) and searched for what must not be there: a plaintext Redis port, a client Job on the
hub, a password anywhere but a Secret's data or a mounted file. test_deploy_sites.py runs them.
"""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

import deploy_checks
import pytest
from deploy_harness import (
    DEPLOY,
    KUBECTL,
    ROOT,
    ParseError,
    cli_env,
    compose_project,
    compose_secret_mounts,
    container_argv,
    container_env,
    fedq_cmd,
    mount_sources,
    parse_fedq,
    read_image,
    render_hub_overlay,
    rewrite_paths,
    secret_volume,
    tmpdir,
)

from fedq.errors import ConfigError
from fedq.ops import acl, k8s_hub, pki
from fedq.ops.k8s_site import Site, read_bundle, site_resources

SITE_COMPOSE = ROOT / "docker-compose.site.yml"
HUB = DEPLOY / "overlays" / "hub"
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (it renders the overlay)")


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    """The hub overlay rendered, with its secrets made as its README says (or just the secrets,
    without kubectl)."""
    tmp = tmp_path_factory.mktemp("hub")
    if KUBECTL is None:
        k8s_hub.write_hub_secrets(tmp / "secrets", ["site-a", "site-b"], ["127.0.0.1", "hub.example.org"])
        return [], tmp / "secrets"
    return render_hub_overlay(tmp)


@pytest.fixture(scope="module")
def hub_secrets(hub: tuple[list[dict[str, Any]], Path]) -> Path:
    return hub[1]


def _validate(docs: list[dict[str, Any]]) -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    for doc in docs:
        for version in ("1.32", latest_version()):
            kubernetes_validate.validate(doc, version, strict=True)
    assert deploy_checks.problems(docs) == []


def _leaks(docs: list[dict[str, Any]], secrets: list[str]) -> list[str]:
    """Secret values in any container's command, args or env values."""
    out = []
    for d in docs:
        for c in (deploy_checks.pod_spec(d) or {}).get("containers", []):
            texts = [*map(str, c.get("command", [])), *map(str, c.get("args", [])),
                     *(str(e.get("value", "")) for e in c.get("env", []))]
            out += [f"{deploy_checks.kn(d)}/{c['name']}" for t in texts for s in secrets if s in t]
    return out


# --- deploy/overlays/hub --------------------------------------------------------------------------
def test_hub_overlay_is_what_fedq_generates() -> None:
    """Regenerate it with `fedq k8s hub-overlay deploy/overlays/hub`."""
    files = k8s_hub.hub_overlay_files()
    on_disk = {str(p.relative_to(HUB)) for p in HUB.rglob("*")
               if p.is_file() and p.relative_to(HUB).parts[0] != "secrets"}
    assert on_disk == set(files) | {"README.md"}
    for name, text in files.items():
        assert (HUB / name).read_text() == text, f"deploy/overlays/hub/{name} differs: regenerate it"


@needs_kubectl
def test_hub_overlay_exposes_redis_over_tls_only_with_one_user_per_site(hub: tuple[list[dict[str, Any]], Path]
                                                                        ) -> None:
    docs, hub_secrets = hub
    # Strict schema validation: test_deploy_manifests.py's of every overlay (slow lane).
    assert deploy_checks.problems(docs) == []
    passwords = acl.parse_passwords((hub_secrets / acl.PASSWORDS_FILE).read_text())
    assert sorted(passwords) == ["fedq-aggregator", "fedq-dashboard", "site-a", "site-b"]
    assert _leaks(docs, list(passwords.values())) == []
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Job", "fedq-clients") not in kinds and ("Job", "fedq-submit") in kinds, "the sites run the clients"
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert (config["FEDQ_CLIENTS"], config["FEDQ_RUN_ID"]) == ("2", "hub-run-1")

    redis = next(d for d in docs if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    args = redis["args"]
    assert args[args.index("--port") + 1] == "0", "no plaintext port"
    assert args[args.index("--tls-port") + 1] == "6379" and args[args.index("--tls-auth-clients") + 1] == "yes"
    external = [d for d in docs if d["kind"] == "Service" and d["spec"].get("type") in ("LoadBalancer", "NodePort")]
    assert [d["metadata"]["name"] for d in external] == ["fedq-redis-external"]
    assert external[0]["spec"]["type"] == "LoadBalancer"
    assert [(p["port"], p["targetPort"]) for p in external[0]["spec"]["ports"]] == [(6379, "redis")]
    assert [p["containerPort"] for p in redis["ports"]] == [6379]  # the TLS port, the only one
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")["spec"]
    assert {p["port"] for rule in policy["ingress"] for p in rule["ports"]} == {6379}

    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    acl_file = base64.b64decode(secrets["fedq-redis-acl"]["data"]["users.acl"]).decode()
    site_a = next(line.split() for line in acl_file.splitlines() if line.split()[1] == "site-a")
    assert "~fedq:{*}:c:site-a:*" in site_a and not any("site-b" in rule for rule in site_a)
    assert not any(p in acl_file for p in passwords.values()), "digests only"


def test_hub_secrets_make_a_bundle_per_site_signed_by_the_hub_ca(hub_secrets: Path) -> None:
    from cryptography import x509

    ca = x509.load_pem_x509_certificate((hub_secrets / pki.CA_CERT).read_bytes())
    server = x509.load_pem_x509_certificate((hub_secrets / pki.CERT).read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "hub.example.org" in names.get_values_for_type(x509.DNSName)
    assert "fedq-redis.fedq-hub.svc" in names.get_values_for_type(x509.DNSName)
    passwords = acl.parse_passwords((hub_secrets / acl.PASSWORDS_FILE).read_text())
    for site in ("site-a", "site-b"):
        bundle = read_bundle(hub_secrets / "sites" / site)
        cert = x509.load_pem_x509_certificate(bundle[pki.CERT])
        cert.verify_directly_issued_by(ca)
        assert cert.subject.rfc4514_string() == f"CN={site}"
        assert bundle[pki.CA_CERT] == (hub_secrets / pki.CA_CERT).read_bytes()
        assert bundle["password"].decode() == passwords[site]
        assert (hub_secrets / "sites" / site).stat().st_mode & 0o077 == 0, "the bundle's folder is its owner's"
    assert (hub_secrets / pki.CA_KEY).stat().st_mode & 0o077 == 0
    # Again: the CA, the passwords and the sites' certificates are kept.
    before = {p: p.read_bytes() for p in (hub_secrets / "sites").rglob("*") if p.is_file()}
    k8s_hub.write_hub_secrets(hub_secrets, ["site-a", "site-b"], ["127.0.0.1", "hub.example.org"])
    assert {p: p.read_bytes() for p in before} == before


def test_hub_refuses_bad_sites() -> None:
    for sites, message in [(["site-a", "site-a"], "distinct"), (["Site_A"], "lower-case"),
                           (["fedq-aggregator"], "another role"), ([], "one or more")]:
        with pytest.raises(ConfigError, match=message):
            k8s_hub.hub_federation(sites)


# --- fedq k8s site --------------------------------------------------------------------------------------
def test_site_kit_mounts_its_own_certificate_password_and_data(hub_secrets: Path, tmp_path: Path) -> None:
    bundle = read_bundle(hub_secrets / "sites" / "site-a")
    docs = site_resources(Site(name="site-a", hub="hub.example.org:6379", run_id="hub-run-1", namespace="lab",
                               bundle=bundle))
    _validate(docs)
    assert [d["kind"] for d in docs] == ["Secret", "PersistentVolumeClaim", "Job"]
    assert _leaks(docs, [bundle["password"].decode()]) == []
    job = docs[-1]
    spec = job["spec"]["template"]["spec"]
    c = spec["containers"][0]
    env = container_env(c, docs)
    volumes = {v["name"]: secret_volume(v, docs, tmpdir(tmp_path, v["name"])) if "secret" in v
               else tmpdir(tmp_path, v["name"]) for v in spec["volumes"]}
    mounts = mount_sources(c, volumes, env)
    local = {k: rewrite_paths(v, mounts) for k, v in env.items()}
    # Each file the client reads is the bundle's, mounted from the site's own Secret.
    for key, name in [("FEDQ_REDIS_PASSWORD_FILE", "password"), ("FEDQ_TLS_CA_CERT", pki.CA_CERT),
                      ("FEDQ_TLS_CERT", pki.CERT), ("FEDQ_TLS_KEY", pki.KEY)]:
        assert Path(local[key]).read_bytes() == bundle[name], key
    assert env["FEDQ_REDIS_URL"] == "rediss://hub.example.org:6379/0" and env["FEDQ_REDIS_USERNAME"] == "site-a"
    data = next(m for m in c["volumeMounts"] if m["mountPath"] == "/data")
    claim = next(v for v in spec["volumes"] if v["name"] == data["name"])["persistentVolumeClaim"]
    assert data["readOnly"] and claim == {"claimName": docs[1]["metadata"]["name"], "readOnly": True}
    name, params = parse_fedq(container_argv(c, read_image(), env), local)
    assert name == "client" and params["client_id"] == "site-a" and params["run_id"] == "hub-run-1"
    # Without a bundle the Secret is expected to exist; with a claim of its own, no new one.
    docs = site_resources(Site(name="site-a", hub="10.0.0.5:30379", data_claim="lab-rows"))
    assert [d["kind"] for d in docs] == ["Job"]


def test_site_kit_refuses_bad_input(hub_secrets: Path, tmp_path: Path) -> None:
    for kw, message in [({"hub": "hub.example.org"}, "HOST:PORT"), ({"hub": "h:99999"}, "HOST:PORT"),
                        ({"name": "Site A"}, "invalid client id"), ({"run_id": "no such/run"}, "run id"),
                        ({"image": "Bad Image"}, "image")]:
        with pytest.raises(ConfigError, match=message):
            Site(**{"name": "site-a", "hub": "h:6379", **kw}).validate()
    (tmp_path / "password").write_text("one\ntwo\n")
    with pytest.raises(ConfigError, match="cannot read"):
        read_bundle(tmp_path)


@pytest.mark.slow
def test_fedq_k8s_site_prints_the_kit_and_bad_input_is_one_line(hub_secrets: Path) -> None:
    def site(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(fedq_cmd("k8s", "site", *args), env=cli_env(), capture_output=True, text=True,
                              timeout=120)

    import yaml

    done = site("site-b", "--hub", "hub.example.org:6379", "--bundle", str(hub_secrets / "sites" / "site-b"))
    assert done.returncode == 0, done.stderr
    printed = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert printed == site_resources(Site(name="site-b", hub="hub.example.org:6379",
                                          bundle=read_bundle(hub_secrets / "sites" / "site-b")))
    for args, message in [(("site-b", "--hub", "nowhere"), "HOST:PORT"),
                          (("site-b", "--hub", "h:1", "--bundle", str(hub_secrets)), "cannot read")]:
        bad = site(*args)
        assert bad.returncode == 1 and message in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr


# --- docker-compose.site.yml -------------------------------------------------------------------------------
SITE_VARIABLES = {"FEDQ_SITE": "site-b", "FEDQ_HUB": "hub.example.org:6379", "FEDQ_RUN_ID": "hub-run-1"}
COMPOSE_SERVICE_KEYS = {"image", "command", "environment", "restart", "read_only", "tmpfs", "cap_drop",
                        "security_opt", "volumes", "pull_policy", "secrets"}


def test_compose_site_runs_one_client_with_its_own_certificate_user_and_data(hub_secrets: Path) -> None:
    bundle = hub_secrets / "sites" / "site-b"
    project = compose_project({**SITE_VARIABLES, "FEDQ_SITE_DIR": str(bundle), "FEDQ_SITE_DATA": "/srv/rows"},
                              (SITE_COMPOSE,))
    assert list(project["services"]) == ["client"]
    svc = project["services"]["client"]
    assert set(svc) <= COMPOSE_SERVICE_KEYS, set(svc) - COMPOSE_SERVICE_KEYS
    assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"] and svc["volumes"] == ["/srv/rows:/data:ro"]
    mounts = compose_secret_mounts(svc, project)
    env = {k: rewrite_paths(v, mounts) for k, v in {**read_image().env, **svc["environment"]}.items()}
    for key, name in [("FEDQ_REDIS_PASSWORD_FILE", "password"), ("FEDQ_TLS_CA_CERT", pki.CA_CERT),
                      ("FEDQ_TLS_CERT", pki.CERT), ("FEDQ_TLS_KEY", pki.KEY)]:
        assert Path(env[key]) == bundle / name, key
    assert env["FEDQ_REDIS_URL"] == "rediss://hub.example.org:6379/0" and env["FEDQ_REDIS_USERNAME"] == "site-b"
    argv = ["fedq", *svc["command"]]
    name, params = parse_fedq(argv, env)
    assert name == "client" and (params["client_id"], params["run_id"], params["once"]) == ("site-b", "hub-run-1", True)
    assert (bundle / "password").read_text() not in " ".join(argv) + " ".join(env.values())
    # The site, the hub and the run must be named.
    for missing in SITE_VARIABLES:
        with pytest.raises(AssertionError, match=missing):
            compose_project({k: v for k, v in SITE_VARIABLES.items() if k != missing}, (SITE_COMPOSE,))
    with pytest.raises(ParseError):
        parse_fedq([*argv[:-1], "--label-colum", "label"], env)
