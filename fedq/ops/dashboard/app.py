"""The dashboard web application (Flask, served by waitress): pages and a JSON API, reads only."""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from flask import Flask, Response, jsonify, render_template, request

from fedq.errors import ConfigError, FedqError, RunNotFound
from fedq.ops.dashboard import snapshot
from fedq.ops.dashboard.readonly import connect_readonly
from fedq.protocol import keys
from fedq.protocol.store import RunStore
from fedq.protocol.vocabulary import Status
from fedq.settings import Settings

log = logging.getLogger("fedq.ops.dashboard")

REFRESH_SECONDS = 2.0  # how often an open page asks for news
# Everything the page loads comes from this server: clusters are often air-gapped.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


COMPARE_MAX = 8  # runs one comparison overlays


class NoModelFile(FedqError):
    """A finished run without a stored model.keras (a 404 naming why, and weights.npz instead)."""


def _make_file(store: RunStore, name: str, time_axis: bool = False) -> tuple[bytes, str]:
    """(body, MIME type) of one download, built from what Redis holds (reads only)."""
    import json
    import tempfile
    from pathlib import Path

    from fedq.protocol import messages
    from fedq.roles import report

    if name == "report.json":
        return json.dumps(_clean(report.build_report(store)), indent=2).encode(), "application/json"
    if name == "curves.png":
        with tempfile.TemporaryDirectory(prefix="fedq-curves-") as tmp:
            path = report.curves(store, report.build_report(store)["rounds"], Path(tmp) / "curves.png",
                                 "time" if time_axis else "round")
            if path is None:
                raise FedqError(f"run {store.run_id} has no committed round to plot")
            return path.read_bytes(), "image/png"
    if name == "scaler.json":
        raw = store.scaler_payload()
        if raw is None:
            raise FedqError(f"run {store.run_id} has no scaler")
        mean, std, meta = messages.decode_scaler(raw)
        return json.dumps(report.scaler_document(mean, std, meta), indent=2).encode(), "application/json"
    if name == snapshot.MODEL_FILE:
        body = store.model_file()
        if body is None:
            raise NoModelFile(snapshot.no_model_file_note(store.spec_record()))
        # A zip archive inside, but not one for the browser to open or unpack: plain bytes.
        return body, "application/octet-stream"
    return report.weights_npz(store), "application/octet-stream"


def _clean(value: Any) -> Any:
    """JSON-safe data: NaN and infinities (which JSON cannot carry) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _error(status: int, message: str) -> Response:
    resp = jsonify({"error": message, "status": status})
    resp.status_code = status
    return resp


def _redis_down(exc: Exception) -> str:
    return f"Redis is unreachable: {type(exc).__name__}: {exc}"


# --- request auth ----------------------------------------------------------------------------
# Served without a credential: probes and load balancers carry none, and it tells nothing of a run.
OPEN_PATHS = frozenset({"/api/health"})
AUTH_REALM = 'Basic realm="fedq dashboard", charset="UTF-8"'


def read_token(path: str | Path) -> str:
    """The access token in a file (its one line), or ConfigError naming the file."""
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"dashboard token file {str(path)!r} is unreadable: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ConfigError(f"dashboard token file {str(path)!r} must hold one token of at least 16 characters "
                          "without white space")
    return token


def is_loopback(host: str) -> bool:
    """Whether an address to listen on is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def presented_token(header: str | None) -> str | None:
    """The token of an Authorization header: Bearer TOKEN, or Basic with TOKEN as the password
    (any user name: a browser's own sign-in prompt then works)."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2]
    return None


def _authorised(token: str, header: str | None) -> bool:
    given = presented_token(header)
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def create_app(r: redis.Redis, *, refresh_seconds: float = REFRESH_SECONDS, token: str | None = None) -> Flask:
    """The dashboard app over a (read-only) Redis client; with token, every request but
    /api/health must present it (HTTP Bearer, or basic auth's password), else 401."""
    app = Flask(__name__, static_folder="static", template_folder="templates")

    @app.before_request
    def require_token() -> Any:
        if token is None or request.path in OPEN_PATHS or _authorised(token, request.headers.get("Authorization")):
            return None
        resp = _error(401, "unauthorised: this dashboard needs its access token "
                           "(Authorization: Bearer TOKEN, or any user name with the token as password)")
        resp.headers["WWW-Authenticate"] = AUTH_REALM
        return resp

    app.json.sort_keys = False  # type: ignore[attr-defined]
    refresh_ms = int(refresh_seconds * 1000)

    def api(fn: Callable[[], Any]) -> Response:
        try:
            return jsonify(_clean(fn()))
        except (RunNotFound, ConfigError) as exc:  # an invalid id names no run either
            return _error(404, str(exc))
        except redis.RedisError as exc:
            log.warning("API %s: %s", request.path, exc)
            return _error(503, _redis_down(exc))

    @app.after_request
    def headers(resp: Response) -> Response:
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        if request.path.startswith("/api/"):
            resp.headers["Cache-Control"] = "no-store"
        return resp

    @app.get("/")
    def runs_page() -> str:
        return render_template("runs.html", refresh_ms=refresh_ms)

    @app.get("/runs/<run_id>")
    def run_page(run_id: str) -> Any:
        try:
            keys.check_run_id(run_id)
            exists = bool(r.exists(keys.RunKeys(run_id).spec))
        except ConfigError:
            exists = False
        except redis.RedisError as exc:
            # Serve the page anyway: it shows the banner and fills in once Redis is back.
            log.warning("run page %s: %s", run_id, exc)
            exists = True
        if not exists:
            return render_template("error.html", status=404, title="Run not found",
                                   message=f"There is no run {run_id!r} in Redis."), 404
        return render_template("run.html", run_id=run_id, refresh_ms=refresh_ms)

    @app.get("/api/runs")
    def api_runs() -> Response:
        limit = request.args.get("limit", default=snapshot.RUNS_LISTED, type=int)
        return api(lambda: snapshot.runs_overview(r, limit=max(1, min(limit or 1, 1000))))

    @app.get("/api/runs/<run_id>")
    def api_run(run_id: str) -> Response:
        return api(lambda: snapshot.run_detail(r, run_id))

    @app.get("/compare")
    def compare_page() -> str:
        return render_template("compare.html", refresh_ms=refresh_ms)

    @app.get("/api/compare")
    def api_compare() -> Response:
        ids = [x for x in (request.args.get("runs") or "").split(",") if x]
        if not 2 <= len(ids) <= COMPARE_MAX:
            return _error(400, f"name 2 to {COMPARE_MAX} runs to compare as ?runs=a,b (got {len(ids)})")
        return api(lambda: snapshot.compare(r, ids))

    @app.get("/runs/<run_id>/files/<name>")
    def download(run_id: str, name: str) -> Response:
        """A finished run's report.json, curves.png, model.keras (as its aggregator stored it),
        scaler.json or weights.npz, made from Redis."""
        if name not in snapshot.DOWNLOADS:
            return _error(404, f"no file {name!r}: a run offers {', '.join(snapshot.DOWNLOADS)}")
        try:
            store = RunStore(r, run_id)
            state = store.state()
            if not state:
                raise RunNotFound(f"no run {run_id!r}")
            if state.get("status") != Status.FINISHED:
                return _error(409, f"run {run_id} is {state.get('status')}: files are served once it finished")
            body, mime = _make_file(store, name, time_axis=request.args.get("axis") == "time")
        except (RunNotFound, ConfigError, NoModelFile) as exc:
            return _error(404, str(exc))
        except FedqError as exc:
            return _error(409, str(exc))
        except redis.RedisError as exc:
            return _error(503, _redis_down(exc))
        resp = Response(body, mimetype=mime)
        resp.headers["Content-Disposition"] = f'attachment; filename="{run_id}-{name}"'
        return resp

    @app.get("/api/health")
    def api_health() -> Response | tuple[Response, int]:
        try:
            r.ping()
            return jsonify({"ok": True, "redis": True})
        except redis.RedisError as exc:
            # Not healthy: a load balancer or probe must see it without parsing the body.
            return jsonify({"ok": False, "redis": False, "error": _redis_down(exc)}), 503

    @app.errorhandler(404)
    def not_found(_exc: Exception) -> Any:
        if request.path.startswith("/api/"):
            return _error(404, f"no such endpoint {request.path}")
        return render_template("error.html", status=404, title="Not found",
                               message=f"Nothing here: {request.path}"), 404

    @app.errorhandler(405)
    def not_allowed(_exc: Exception) -> Any:
        return _error(405, "read-only: only GET is served")

    return app


def check_auth(host: str, token: str | None) -> None:
    """ConfigError when the dashboard would listen beyond this machine without a token."""
    if token is None and not is_loopback(host):
        raise ConfigError(f"fedq dashboard --host {host} listens beyond 127.0.0.1: give it an access token "
                          "(--token-file FILE or FEDQ_DASHBOARD_TOKEN_FILE)")


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8050, threads: int = 8,
          refresh_seconds: float = REFRESH_SECONDS, token: str | None = None) -> None:
    """Serve the dashboard with waitress until the process is stopped."""
    from waitress import serve as waitress_serve

    check_auth(host, token)
    app = create_app(connect_readonly(settings), refresh_seconds=refresh_seconds, token=token)
    log.info("dashboard on http://%s:%d/ (reads Redis only)", host, port)
    waitress_serve(app, host=host, port=port, threads=threads, ident="fedq-dashboard")
