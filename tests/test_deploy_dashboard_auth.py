"""The dashboard's access token: required beyond 127.0.0.1, 401 without it, /api/health open."""

from __future__ import annotations

import base64
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from deploy_harness import cli_env, fedq_cmd, free_port

from fedq.errors import ConfigError
from fedq.ops.dashboard.app import check_auth, presented_token, read_token

TOKEN = "a-dashboard-token-for-tests-0123"


def _get(url: str, auth: str | None = None) -> tuple[int, dict[str, str]]:
    """(status, headers with lower-case names)."""
    req = urllib.request.Request(url, headers={"Authorization": auth} if auth else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_a_dashboard_beyond_loopback_needs_a_token(tmp_path: Path) -> None:
    check_auth("127.0.0.1", None)
    check_auth("::1", None)
    check_auth("localhost", None)
    for host in ("0.0.0.0", "10.1.2.3", "::", "dashboard.example.com"):
        with pytest.raises(ConfigError, match="--token-file"):
            check_auth(host, None)
        check_auth(host, TOKEN)
    (tmp_path / "short").write_text("short\n")
    with pytest.raises(ConfigError, match="at least 16"):
        read_token(tmp_path / "short")
    with pytest.raises(ConfigError, match="unreadable"):
        read_token(tmp_path / "missing")
    assert presented_token(f"Bearer {TOKEN}") == TOKEN
    assert presented_token(_basic("anyone", TOKEN)) == TOKEN
    assert presented_token("Basic !!!") is None and presented_token("Digest x") is None


def test_fedq_dashboard_refuses_to_listen_beyond_loopback_without_a_token(redis_url: str) -> None:
    done = subprocess.run(fedq_cmd("dashboard", "--host", "0.0.0.0", "--port", str(free_port())),
                          env=cli_env(redis_url), capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "listens beyond 127.0.0.1" in done.stderr and "--token-file" in done.stderr


def test_served_dashboard_answers_401_without_its_token(redis_url: str, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    # As the manifests and compose start it: every interface, the token from a mounted file.
    proc = subprocess.Popen(fedq_cmd("dashboard", "--host", "0.0.0.0", "--port", str(port)),
                            env=cli_env(redis_url, FEDQ_DASHBOARD_TOKEN_FILE=str(token_file)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, _ = _get(f"{base}/api/health")
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline, "the dashboard did not start"
                time.sleep(0.2)
        assert status == 200, "the probes' endpoint needs no token"
        for path in ("/", "/api/runs", "/runs/some-run", "/static/app.js"):
            status, headers = _get(base + path)
            assert status == 401, path
            assert headers.get("www-authenticate", "").startswith("Basic"), path
            assert _get(base + path, f"Bearer {TOKEN}x")[0] == 401
            assert _get(base + path, _basic("admin", "wrong-token-value"))[0] == 401
        assert _get(f"{base}/api/runs", f"Bearer {TOKEN}")[0] == 200
        assert _get(f"{base}/", _basic("anyone", TOKEN))[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=20)
