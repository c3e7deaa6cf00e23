"""Redis over TLS: a CA made by the test, a TLS-only redis-server, fedq's own connection code."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from support.procs import cli_env, fedq_cmd
from support.redis import RedisServer, free_port

from fedq.errors import ConfigError, RedisUnavailable
from fedq.protocol.connection import connect
from fedq.settings import Settings

pytestmark = [pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make certificates"),
              pytest.mark.slow]  # certificates, TLS servers and CLI processes: seconds each


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=fedq-test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext", cwd=d)
    # A second, unrelated CA: a client trusting it must refuse the server.
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out", "other.crt",
             "-days", "2", "-subj", "/CN=other-ca", cwd=d)
    return d


@pytest.fixture(scope="module")
def tls_server(pki: Path):
    port = free_port()
    # TLS only (no plain port), and clients must present a certificate signed by the CA.
    server = RedisServer("--port", "0", "--tls-port", str(port), "--tls-cert-file", str(pki / "server.crt"),
                         "--tls-key-file", str(pki / "server.key"), "--tls-ca-cert-file", str(pki / "ca.crt"),
                         "--tls-auth-clients", "yes",
                         ready=lambda _s: socket.create_connection(("127.0.0.1", port), timeout=1).close() is None)
    server.tls_port = port
    yield server
    server.stop()


def _settings(url: str, pki: Path, **over: str) -> Settings:
    values = {"redis_url": url, "tls_ca_cert": str(pki / "ca.crt"), "tls_cert": str(pki / "client.crt"),
              "tls_key": str(pki / "client.key"), "connect_timeout": 2.0}
    values.update(over)
    return Settings.from_env(env={}, **values)


def test_tls_with_the_test_ca_and_a_client_certificate_works(tls_server, pki: Path) -> None:
    r = connect(_settings(f"rediss://127.0.0.1:{tls_server.tls_port}/0", pki))
    assert r.ping()
    r.set("fedq:tls-check", "1")
    assert r.get("fedq:tls-check") == b"1"


def test_plain_connection_to_the_tls_port_is_refused(tls_server, pki: Path) -> None:
    with pytest.raises(RedisUnavailable):
        connect(Settings.from_env(env={}, redis_url=f"redis://127.0.0.1:{tls_server.tls_port}/0",
                                  connect_timeout=2.0, socket_timeout=3.0))


def test_a_server_signed_by_another_ca_is_refused(tls_server, pki: Path) -> None:
    with pytest.raises(RedisUnavailable, match="certificate"):
        connect(_settings(f"rediss://127.0.0.1:{tls_server.tls_port}/0", pki, tls_ca_cert=str(pki / "other.crt")))


def test_without_a_client_certificate_the_server_refuses(tls_server, pki: Path) -> None:
    with pytest.raises(RedisUnavailable):
        connect(_settings(f"rediss://127.0.0.1:{tls_server.tls_port}/0", pki, tls_cert="", tls_key=""))


def test_tls_settings_are_checked(pki: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        Settings.from_env(env={}, redis_url="rediss://127.0.0.1:1/0", tls_ca_cert=str(pki / "missing.crt"))
    with pytest.raises(ConfigError, match="go together"):
        Settings.from_env(env={}, redis_url="rediss://127.0.0.1:1/0", tls_cert=str(pki / "client.crt"))
    with pytest.raises(ConfigError, match="rediss://"):
        Settings.from_env(env={}, redis_url="redis://127.0.0.1:1/0", tls_ca_cert=str(pki / "ca.crt"))


def test_the_cli_talks_tls_from_its_environment(tls_server, pki: Path) -> None:
    env = cli_env(f"rediss://127.0.0.1:{tls_server.tls_port}/0") | {
        "FEDQ_TLS_CA_CERT": str(pki / "ca.crt"), "FEDQ_TLS_CERT": str(pki / "client.crt"),
        "FEDQ_TLS_KEY": str(pki / "client.key")}
    done = subprocess.run(fedq_cmd("submit", "--clients", "2", "--rounds", "1", "--run-id", "over-tls"),
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    status = subprocess.run(fedq_cmd("status", "--run", "over-tls"), env=env, capture_output=True, text=True,
                            timeout=60)
    assert status.returncode == 0 and "queued" in status.stdout, status.stdout + status.stderr
