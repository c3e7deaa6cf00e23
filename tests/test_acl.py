"""Redis ACL users per role, on a real redis-server started with the ACL file fedq acl writes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from click.testing import CliRunner
from support.fake_client import fake_client_cmd, fake_client_env
from support.redis import RedisServer

from fedq.cli import main
from fedq.learning.spec import RunSpec
from fedq.ops import acl
from fedq.ops.dashboard import snapshot
from fedq.protocol import messages
from fedq.protocol.keys import RunKeys
from fedq.protocol.store import RunStore

CLIENTS = ["client-0", "client-1"]
NOPERM = (redis.exceptions.NoPermissionError, redis.exceptions.ResponseError)


@pytest.fixture(scope="module")
def federation_users(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, dict[str, acl.User]]]:
    users = acl.users(CLIENTS)
    path = tmp_path_factory.mktemp("acl") / "users.acl"
    path.write_text(acl.aclfile(users))
    by_name = {u.name: u for u in users}
    # The server refuses a plain PING: it is ready when the aggregator's user gets an answer.
    server = RedisServer("--aclfile", str(path), ready=lambda s: _as(s, by_name[acl.AGGREGATOR_USER]).ping())
    yield server, by_name
    server.stop()


def _url(server: RedisServer, user: acl.User) -> str:
    return user.url("127.0.0.1", server.port)


def _as(server: RedisServer, user: acl.User) -> redis.Redis:
    return redis.Redis.from_url(_url(server, user), socket_timeout=5)


def _open_run(agg: redis.Redis, run_id: str) -> tuple[RunStore, list[np.ndarray]]:
    store = RunStore(agg, run_id)
    store.create(RunSpec(clients=2, rounds=1))
    return store, [np.zeros((3, 2), np.float32), np.zeros(2, np.float32)]


@pytest.mark.slow
def test_the_default_user_is_off_and_wrong_passwords_are_refused(federation_users) -> None:
    server, _users = federation_users
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=server.port, socket_timeout=5).ping()
    forged = acl.User("client-0", "not-the-password", ())
    with pytest.raises(redis.exceptions.AuthenticationError):
        _as(server, forged).ping()


def test_a_client_writes_its_own_keys_and_nothing_else(federation_users) -> None:
    server, users = federation_users
    agg_store, weights = _open_run(_as(server, users[acl.AGGREGATOR_USER]), "acl-own")
    c0, c1 = _as(server, users["client-0"]), _as(server, users["client-1"])
    s0, s1 = RunStore(c0, "acl-own"), RunStore(c1, "acl-own")
    assert s0.join("client-0", {"shard": 0, "rows": 5}, {"count": [5]}) == "requested"
    assert s1.join("client-1", {"shard": 1, "rows": 5}, {"count": [5]}) == "requested"
    assert sorted(agg_store.take_join_requests()) == CLIENTS  # each join step added its id (SADD)
    assert agg_store.acquire_lease("driver", 30)
    assert agg_store.admit("client-0") and agg_store.admit("client-1")
    names = ["w", "b"]
    assert agg_store.open_training(b"scaler", messages.encode_global("acl-own", 0, names, weights))
    assert s0.global_payload() is not None and s0.state()["phase"] == "train"

    def update(cid: str) -> bytes:
        return messages.encode_update("acl-own", 1, cid, 5, {}, names, weights)

    assert s0.push_update("client-0", 1, update("client-0"), 1 << 20) == "ok"
    assert s1.push_update("client-1", 1, update("client-1"), 1 << 20) == "ok"
    assert agg_store.read_update(1, "client-0", "", 1 << 20).payload == update("client-0")

    k = RunKeys("acl-own")
    attempts = {
        "push as another client": lambda: s0.push_update("client-1", 1, update("client-1"), 1 << 20),
        "write another client's update": lambda: c0.hset(k.update("client-1", 1), "payload", b"forged"),
        "write another client's update body": lambda: c0.set(k.update_body("client-1", 1), b"forged"),
        "take another client's update body": lambda: c0.rename(k.update_body("client-1", 1),
                                                               k.update_body("client-0", 2)),
        "put its own bytes where the aggregator takes them": lambda: c0.rename(k.update_staged("client-0"),
                                                                              k.update_taken("client-0", 1)),
        "read another client's update": lambda: c0.get(k.update_body("client-1", 1)),
        "read what the aggregator took of it": lambda: c0.get(k.update_taken("client-1", 1)),
        "read a model staged for a commit": lambda: c0.get(k.global_staged),
        "overwrite the global model": lambda: c0.set(k.global_model, b"forged"),
        "move the round counter": lambda: c0.hset(k.state, "round", 7),
        "drop a member": lambda: c0.srem(k.members, "client-1"),
        "add a member": lambda: c0.sadd(k.members, "junk"),
        "read the audit trail": lambda: c0.xrange(k.judged),
        "forge an audit entry": lambda: c0.xadd(k.judged, {"client": "client-0"}),
        "delete the audit trail": lambda: c0.delete(k.judged),
        "empty the inbox": lambda: c0.delete(k.inbox),
        "take the aggregator's wake-ups (BLPOP)": lambda: c0.blpop([k.inbox], timeout=0.01),
        "wait on another client's answers (BLPOP)": lambda: c0.blpop([k.answered("client-1")], timeout=0.01),
        "withdraw another client's join request": lambda: c0.srem(k.joins, "client-1"),
        "take the waiting join requests": lambda: c0.spop(k.joins),
        "read the waiting join requests": lambda: c0.smembers(k.joins),
        "empty the waiting join requests": lambda: c0.delete(k.joins),
        "make the waiting join requests another type": lambda: c0.set(k.joins, "x"),
        "take the lease": lambda: c0.set(k.lease, "me"),
        "store a model file for the dashboard": lambda: c0.set(k.model_file, b"PK\x03\x04forged"),
        "read the model file": lambda: c0.get(k.model_file),
        "forge an aggregator refusal": lambda: c0.rpush(k.refused, "{}"),
        "a script writing the global model": lambda: c0.eval("return redis.call('SET', ARGV[1], 'x')", 0,
                                                            k.global_model),
        "a script declaring the global model": lambda: c0.eval("return 1", 1, k.global_model),
        "flush the database": lambda: c0.flushall(),
        "list every key": lambda: c0.keys("*"),
        "rewrite the configuration": lambda: c0.config_set("appendonly", "no"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(NOPERM, match=r"(?i)noperm|permission|access"):
            attempt()
            pytest.fail(f"a client could {what}")
    # Nothing of the above landed: the global model and client-1's update are as written.
    assert agg_store.global_payload() == messages.encode_global("acl-own", 0, names, weights)
    assert agg_store.model_file() is None
    stored = agg_store.read_update(1, "client-1", "", 1 << 20)
    assert (stored.payload, stored.seq) == (update("client-1"), "1")
    assert agg_store.member_ids() == CLIENTS


def test_the_dashboard_reads_everything_and_writes_nothing(federation_users) -> None:
    server, users = federation_users
    agg = _as(server, users[acl.AGGREGATOR_USER])
    _open_run(agg, "acl-dash")
    dash = _as(server, users[acl.DASHBOARD_USER])
    assert snapshot.run_detail(dash, "acl-dash")["status"] == "queued"
    assert "acl-dash" in {r["run_id"] for r in snapshot.runs_overview(dash)["runs"]}
    k = RunKeys("acl-dash")
    agg.set(k.model_file, b"PK\x03\x04 as the aggregator stores it")
    assert RunStore(dash, "acl-dash").model_file() == b"PK\x03\x04 as the aggregator stores it"
    for attempt in (lambda: dash.set(k.global_model, b"x"), lambda: dash.hset(k.state, "status", "failed"),
                    lambda: dash.delete(k.spec), lambda: dash.eval("return 1", 0),
                    lambda: dash.set(k.model_file, b"PK\x03\x04forged")):
        with pytest.raises(NOPERM):
            attempt()
    assert RunStore(agg, "acl-dash").state()["status"] == "queued"
    assert RunStore(agg, "acl-dash").model_file() == b"PK\x03\x04 as the aggregator stores it"


@pytest.mark.slow
def test_a_federation_runs_with_one_acl_user_per_process(federation_users, tmp_path: Path) -> None:
    """fedq aggregator and two fedq clients, each its own ACL user: the rules are enough,
    with models in parts too. The clients train with FakeTrainer (support.fake_client: what
    they read and write in Redis is fedq's own); the aggregator evaluates and saves model.keras."""
    server, users = federation_users

    def start(user: acl.User, *args: str) -> subprocess.Popen:
        # Models in parts as well (the seed model then travels in two): parts are keys too.
        env = {**os.environ, "FEDQ_REDIS_URL": _url(server, user), "FEDQ_TF_THREADS": "1",
               "FEDQ_BLOCK_SECONDS": "0.5", "FEDQ_CHUNK_BYTES": "1024"}
        argv = [sys.executable, "-m", "fedq", *args] if args[0] == "aggregator" else fake_client_cmd(*args)
        with open(tmp_path / f"{user.name}.log", "w") as log:  # the child keeps its own descriptor
            return subprocess.Popen(argv, env=fake_client_env(env), stdout=log, stderr=subprocess.STDOUT)

    agg = start(users[acl.AGGREGATOR_USER], "aggregator", "--clients", "2", "--rounds", "2",
                "--run-id", "acl-fed", "--local-epochs", "1")
    clients = [start(users[cid], "client", "--shard", str(k), "--run", "acl-fed", "--client-id", cid, "--once")
               for k, cid in enumerate(CLIENTS)]
    try:
        codes = [p.wait(timeout=240) for p in (agg, *clients)]
    finally:
        for p in (agg, *clients):
            if p.poll() is None:
                p.kill()
    logs = {p.name: p.read_text()[-2000:] for p in tmp_path.glob("*.log")}
    assert codes == [0, 0, 0], logs
    dash_store = RunStore(_as(server, users[acl.DASHBOARD_USER]), "acl-fed")
    state = dash_store.state()
    assert state["status"] == "finished" and state["round"] == "2", (state, logs)
    assert (dash_store.model_file() or b"")[:4] == b"PK\x03\x04", logs  # the aggregator's user stored model.keras
    assert all("in 2 parts" in logs[f"{cid}.log"] for cid in CLIENTS), logs


def test_fedq_acl_prints_rules_and_keeps_passwords_in_a_private_file(tmp_path: Path) -> None:
    out = tmp_path / "passwords.env"
    res = CliRunner().invoke(main, ["acl", "--clients", "3", "--run", "run-7", "--passwords", str(out)])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert lines[0] == acl.default_user_off()
    assert [ln.split()[1] for ln in lines[1:]] == [acl.AGGREGATOR_USER, acl.DASHBOARD_USER,
                                                   "client-0", "client-1", "client-2"]
    assert "~fedq:{run-7}:c:client-1:*" in lines[4] and "(~fedq:{run-7}:inbox +rpush)" in lines[4]
    assert "(~fedq:{run-7}:joins +sadd)" in lines[4]
    passwords = acl.parse_passwords(out.read_text())
    assert set(passwords) == {acl.AGGREGATOR_USER, acl.DASHBOARD_USER, "client-0", "client-1", "client-2"}
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    assert all(p not in res.output for p in passwords.values())  # only digests on stdout
    # Run again: the same passwords are reused, so the printed file is stable.
    again = CliRunner().invoke(main, ["acl", "--clients", "3", "--run", "run-7", "--passwords", str(out)])
    assert again.output == res.output


@pytest.mark.parametrize("args, message", [
    (["--clients", "0"], "at least one client"),
    (["--client-ids", "a,a"], "distinct"),
    (["--client-ids", "c:1"], "invalid client id"),
    (["--client-ids", "fedq-aggregator"], "reserved"),
    (["--clients", "2", "--run", "bad run"], "invalid run id"),
])
def test_fedq_acl_bad_input_is_a_clear_error(args: list[str], message: str) -> None:
    res = CliRunner().invoke(main, ["acl", *args])
    assert res.exit_code != 0 and message in res.output, res.output


# --- a user and a password file instead of a URL with the password (what deployments mount) ------
def test_a_process_connects_as_its_user_from_a_password_file(federation_users, tmp_path: Path) -> None:
    from fedq.errors import ConfigError
    from fedq.protocol.connection import connect, redact
    from fedq.settings import Settings

    server, users = federation_users
    user = users["client-1"]
    (tmp_path / "password").write_text(user.password + "\n")  # a trailing newline is not part of it
    env = {"FEDQ_REDIS_URL": f"redis://127.0.0.1:{server.port}/0", "FEDQ_REDIS_USERNAME": user.name,
           "FEDQ_REDIS_PASSWORD_FILE": str(tmp_path / "password")}
    settings = Settings.from_env(env=env)
    assert settings.redis_url == f"redis://client-1:{user.password}@127.0.0.1:{server.port}/0"
    assert user.password not in redact(settings.redis_url)
    assert settings.with_credentials() == settings  # completing twice changes nothing
    _open_run(_as(server, users[acl.AGGREGATOR_USER]), "from-file")
    r = connect(settings)
    assert RunStore(r, "from-file").join("client-1", {"shard": 1, "rows": 5}, {"count": [5]}) == "requested"
    with pytest.raises(NOPERM):
        r.set(RunKeys("from-file").global_model, b"forged")
    # The file's user wins over credentials in the URL (an rq work horse inherits the completed URL).
    over = Settings.from_env(env={**env, "FEDQ_REDIS_URL": f"redis://someone:else@127.0.0.1:{server.port}/0"})
    assert over.redis_url == settings.redis_url
    # Characters a URL would need escaped survive the round trip through redis-py's URL parsing.
    (tmp_path / "odd").write_text("p@ss:w/rd%")
    odd = Settings.from_env(env={**env, "FEDQ_REDIS_PASSWORD_FILE": str(tmp_path / "odd")})
    kwargs = redis.connection.parse_url(odd.redis_url)
    assert (kwargs["username"], kwargs["password"]) == ("client-1", "p@ss:w/rd%")

    (tmp_path / "empty").write_text("\n")
    for bad, message in [({"FEDQ_REDIS_PASSWORD_FILE": ""}, "needs FEDQ_REDIS_PASSWORD_FILE"),
                         ({"FEDQ_REDIS_PASSWORD_FILE": str(tmp_path / "missing")}, "no such file"),
                         ({"FEDQ_REDIS_PASSWORD_FILE": str(tmp_path / "empty")}, "is empty"),
                         ({"FEDQ_REDIS_URL": "unix:///tmp/redis.sock"}, "redis:// or rediss://")]:
        with pytest.raises(ConfigError, match=message):
            Settings.from_env(env={**env, **bad})


def test_fedq_acl_out_writes_what_deployments_mount(tmp_path: Path) -> None:
    out = tmp_path / "fedq-acl"
    res = CliRunner().invoke(main, ["acl", "--clients", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    names = {acl.AGGREGATOR_USER, acl.DASHBOARD_USER, "client-0", "client-1"}
    assert {p.name for p in out.iterdir()} == {"users.acl", "passwords.env", *(f"{n}.password" for n in names)}
    passwords = acl.parse_passwords((out / "passwords.env").read_text())
    assert set(passwords) == names
    for name in names:
        assert (out / f"{name}.password").read_text() == passwords[name]  # the password alone, no newline
    assert oct(out.stat().st_mode & 0o777) == "0o700"
    assert oct((out / "passwords.env").stat().st_mode & 0o777) == "0o600"
    acl_text = (out / "users.acl").read_text()
    assert acl_text == acl.aclfile(acl.users(["client-0", "client-1"], "*", passwords))
    assert all(p not in acl_text and p not in res.output for p in passwords.values())
    # Again: the same passwords, the same ACL file.
    again = CliRunner().invoke(main, ["acl", "--clients", "2", "--out", str(out)])
    assert again.exit_code == 0 and (out / "users.acl").read_text() == acl_text
    bad = CliRunner().invoke(main, ["acl", "--clients", "2", "--out", str(out), "--passwords", str(tmp_path / "p")])
    assert bad.exit_code != 0 and "--out writes its own" in bad.output


def test_a_client_writes_only_its_own_secure_aggregation_messages(federation_users) -> None:
    server, users = federation_users
    agg = _as(server, users[acl.AGGREGATOR_USER])
    c0 = _as(server, users["client-0"])
    k = RunKeys("acl-secagg")
    agg.set(k.secagg_public(1, "roster"), b"roster")
    agg.set(k.secagg_inbox(1, "client-0"), b"inbox")
    # Its own messages, the hint, and what the aggregator publishes are within reach.
    for stage in ("keys", "shares", "reveal"):
        assert c0.set(k.secagg("client-0", 1, stage), b"mine")
    assert c0.rpush(k.secagg_hints, "client-0") == 1
    assert c0.get(k.secagg_public(1, "roster")) == b"roster" and c0.get(k.secagg_inbox(1, "client-0")) == b"inbox"
    attempts = {
        "write another client's shares": lambda: c0.set(k.secagg("client-1", 1, "shares"), b"forged"),
        "read another client's reveal": lambda: c0.get(k.secagg("client-1", 1, "reveal")),
        "publish a roster": lambda: c0.set(k.secagg_public(1, "roster"), b"forged"),
        "publish survivors": lambda: c0.set(k.secagg_public(1, "survivors"), b"forged"),
        "fill another client's inbox": lambda: c0.set(k.secagg_inbox(1, "client-1"), b"forged"),
        "empty the hint list": lambda: c0.delete(k.secagg_hints),
    }
    for what, attempt in attempts.items():
        with pytest.raises(NOPERM, match=r"(?i)noperm|permission|access"):
            attempt()
            pytest.fail(f"a client could {what}")
    assert agg.get(k.secagg_public(1, "roster")) == b"roster"
