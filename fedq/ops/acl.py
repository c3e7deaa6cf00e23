"""Redis ACL users per role, with least privilege through key patterns.

Three roles, each its own Redis user:

- a **client** (one user per client id) reads what every client may read (the run's spec,
  state, global model and its parts, scaler, events, the chosen clients) and writes only keys under its own
  prefix ``fedq:{run}:c:<client>:*``; three shared keys take one narrow command each, through
  ACL selectors: ``RPUSH`` to the run's inbox and to its secure-aggregation wake-ups, and ``SADD``
  to its waiting join requests, mere hints that the aggregator checks against what the named
  client stored under its own keys. The member set, the audit trail (``judged``) and the final
  model file (``model-file``, which the dashboard serves as model.keras) are the aggregator's
  alone: a client asks to join under its own key and the aggregator admits it;
- the **aggregator** (also used by ``fedq submit`` and ``fedq run``) owns every fedq and rq
  key, without the dangerous commands (FLUSHALL, CONFIG, KEYS, DEBUG, ...);
- the **dashboard** reads fedq and rq keys and writes nothing.

The rules come out as ``ACL SETUSER`` commands (for ``redis-cli``) or as ACL-file lines that
carry only SHA-256 digests of the passwords (for a Kubernetes Secret or a compose mount).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedq.errors import ConfigError
from fedq.protocol import keys

AGGREGATOR_USER = "fedq-aggregator"
DASHBOARD_USER = "fedq-dashboard"
# The files of `fedq acl --out DIR`: what deployments mount (README, Deploying).
ACL_FILE = "users.acl"
PASSWORDS_FILE = "passwords.env"
PASSWORD_SUFFIX = ".password"

# What every role needs to connect: redis-py's handshake and health checks (its CLIENT SETINFO,
# which Redis 7.0 does not know, may fail: redis-py ignores that), and scripts (EVALSHA first,
# SCRIPT LOAD when the server does not know the script yet).
_CONNECT = ["+ping", "+hello", "+auth", "+select", "+client|setname", "+client|getname", "+echo", "+info"]
_SCRIPTS = ["+evalsha", "+eval", "+script|load", "+script|exists"]
# A client's commands: the reads of its round loop (STRLEN: a part's size is checked before it
# is read), writes to its own keys (the heartbeat is a SET with expiry; the Lua steps do the
# rest) and MULTI/EXEC for redis-py pipelines. BLPOP: a joining client waits on its own answered
# list; TYPE and RENAME: its push step checks the bytes it staged and moves them to its update body.
_CLIENT_COMMANDS = ["+get", "+strlen", "+mget", "+hget", "+hgetall", "+hmget", "+exists", "+sismember",
                    "+smembers", "+scard", "+xread", "+xrange", "+xrevrange", "+zrange", "+zrevrange", "+set", "+del",
                    "+hset", "+hdel", "+hincrby", "+rpush", "+ltrim", "+xadd", "+multi", "+exec", "+discard",
                    "+blpop", "+type", "+rename"]


@dataclass(frozen=True)
class User:
    """One Redis ACL user: its name, password and rules (without the password)."""

    name: str
    password: str
    rules: tuple[str, ...]

    def setuser(self) -> str:
        """An ``ACL SETUSER`` command (plain password: for redis-cli, not for files)."""
        return " ".join(["ACL", "SETUSER", self.name, "reset", "on", f">{self.password}", *self.rules])

    def aclfile_line(self) -> str:
        """A line of a Redis ACL file: the password only as its SHA-256 digest."""
        digest = hashlib.sha256(self.password.encode()).hexdigest()
        return " ".join(["user", self.name, "reset", "on", f"#{digest}", *self.rules])

    def url(self, host: str = "redis", port: int = 6379, scheme: str = "redis") -> str:
        """The FEDQ_REDIS_URL this user connects with."""
        return f"{scheme}://{self.name}:{self.password}@{host}:{port}/0"


def _run_base(run_id: str) -> str:
    # '*' writes rules for every run; a run id confines the user to that one run.
    if run_id == "*":
        return f"{keys.PREFIX}:{{*}}"
    return keys.RunKeys(run_id).base


def client_rules(client_id: str, run_id: str = "*") -> tuple[str, ...]:
    """ACL rules of one client: read the run's shared keys, write only its own."""
    keys.check_client_id(client_id)
    base = _run_base(run_id)
    readable = [keys.RUNS, keys.EVENTS, *(f"{base}:{name}" for name in
                                         ("spec", "state", "global*", "scaler", "events", "members", "selected:*",
                                          "secagg:*", "consumed:*"))]
    return ("resetkeys", "resetchannels", "-@all", *_CONNECT, *_SCRIPTS, *_CLIENT_COMMANDS,
            *(f"%R~{pattern}" for pattern in readable), f"~{base}:c:{client_id}:*",
            f"(~{base}:inbox +rpush)", f"(~{base}:secagg-hints +rpush)", f"(~{base}:joins +sadd)")


def aggregator_rules() -> tuple[str, ...]:
    """ACL rules of the aggregator (and of fedq submit): every fedq and rq key and channel,
    no dangerous command."""
    return ("resetkeys", "resetchannels", f"~{keys.PREFIX}:*", "~rq:*", "&rq:*", "+@all", "-@dangerous",
            *_CONNECT)


def dashboard_rules() -> tuple[str, ...]:
    """ACL rules of the dashboard: read fedq and rq keys, write nothing."""
    return ("resetkeys", "resetchannels", f"%R~{keys.PREFIX}:*", "%R~rq:*", "-@all", "+@read", "-@dangerous",
            "+scan", *_CONNECT)


def users(client_ids: Sequence[str], run_id: str = "*", passwords: dict[str, str] | None = None) -> list[User]:
    """The users of a federation: the aggregator, the dashboard and one per client. Passwords
    are taken from ``passwords`` (user name -> password) or made fresh."""
    if run_id != "*":
        keys.check_run_id(run_id)
    if len(set(client_ids)) != len(client_ids):
        raise ConfigError("client ids must be distinct")
    reserved = {AGGREGATOR_USER, DASHBOARD_USER, "default"} & set(client_ids)
    if reserved:
        raise ConfigError(f"client id {sorted(reserved)[0]!r} is reserved for another role")
    given = passwords or {}

    def password(name: str) -> str:
        return given.get(name) or secrets.token_urlsafe(24)

    out = [User(AGGREGATOR_USER, password(AGGREGATOR_USER), aggregator_rules()),
           User(DASHBOARD_USER, password(DASHBOARD_USER), dashboard_rules())]
    out += [User(cid, password(cid), client_rules(cid, run_id)) for cid in client_ids]
    return out


def default_user_off() -> str:
    """The ACL-file line that disables Redis's passwordless default user."""
    return "user default off resetkeys -@all"


def aclfile(all_users: Iterable[User]) -> str:
    """A complete Redis ACL file: the default user off, then one line per user."""
    return "\n".join([default_user_off(), *(u.aclfile_line() for u in all_users)]) + "\n"


def parse_passwords(text: str) -> dict[str, str]:
    """``user=password`` lines (as fedq acl writes them) -> mapping; blank and # lines skipped."""
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ConfigError(f"passwords file line {n}: expected user=password")
        out[name.strip()] = value.strip()
    return out


def passwords_text(all_users: Iterable[User]) -> str:
    """The user=password file (also a kustomize env file and a compose .env-style file)."""
    return "".join(f"{u.name}={u.password}\n" for u in all_users)


def write_dir(directory: Path, all_users: Sequence[User]) -> list[Path]:
    """The files deployments mount: ``users.acl`` (digests only), ``passwords.env`` (every
    password, mode 0600) and ``<user>.password`` (one password each, nothing else in the file).

    The directory is mode 0700, so that only its owner reaches any of it. The one-password files
    are 0644 inside it: docker compose bind-mounts them with the host's owner and mode, and a
    container runs as its own user (fedq's 10001), which must be able to read its file.
    """
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    written = []

    def write(name: str, text: str, mode: int) -> None:
        path = directory / name
        path.touch(mode=mode)
        path.chmod(mode)
        path.write_text(text)
        written.append(path)

    write(PASSWORDS_FILE, passwords_text(all_users), 0o600)
    write(ACL_FILE, aclfile(all_users), 0o644)
    for u in all_users:
        write(u.name + PASSWORD_SUFFIX, u.password, 0o644)
    return written
