"""One frozen settings object, read from ``FEDQ_*`` environment variables and CLI flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from fedq.errors import ConfigError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class Settings:
    """Process-wide settings; Kubernetes and compose set them as FEDQ_* env vars."""

    redis_url: str = DEFAULT_REDIS_URL
    # A Redis ACL user and a file holding its password (a mounted Secret): when the file is
    # set, the URL's credentials are these (each pod of a deployment its own user, no password
    # in its environment).
    redis_username: str = ""
    redis_password_file: str = ""
    queue: str = "fedq-runs"
    # Upper bound of any single blocking Redis call, so loops recheck state and signals.
    block_seconds: float = 1.0
    socket_timeout: float = 30.0
    connect_timeout: float = 5.0
    # How long a client waits for a run to appear / a round to move before giving up.
    wait_seconds: float = 3600.0
    # rq job timeout of a run (the whole federation), in seconds.
    job_timeout: int = 7 * 24 * 3600
    # Cap on one update's bytes (all its parts together when it travels in parts).
    max_update_bytes: int = 512 * 1024 * 1024
    # Versions of one client's update the aggregator reads in one round: a re-push (a restarted
    # client) replaces the update it pushed before, and past this many a client's pushes for the
    # round are refused unread, so that re-pushing cannot make the aggregator read without end.
    max_pushes_per_round: int = 4
    # Models larger than this travel as parts of at most this many bytes, each its own Redis
    # key (0: always whole; Redis caps one value at 512 MB).
    chunk_bytes: int = 16 * 1024 * 1024
    # Cap on the final model's .keras file the aggregator stores in Redis for the dashboard's
    # model.keras download (0: never store it; a larger file is skipped, with a warning).
    max_model_file_bytes: int = 64 * 1024 * 1024
    log_level: str = "INFO"
    # Seconds an aggregator's lease on a run lasts without renewal: how soon a standby
    # takes over a run whose driver died.
    lease_seconds: float = 15.0
    # Seconds a client's heartbeat outlives its last refresh (refreshed every third of it): how
    # soon a round stops waiting for a client that died.
    heartbeat_seconds: float = 15.0
    # Reconnect attempts (with exponential backoff, capped at 3 s) when Redis goes away.
    reconnect_retries: int = 20
    # TensorFlow threads per client process (0 = TensorFlow's default, one pool per core).
    tf_threads: int = 0
    # TLS for rediss:// URLs: the CA that signed the server's certificate, and this
    # process's own certificate and key when the server asks clients for one.
    tls_ca_cert: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # Signed updates: a client's Ed25519 private key (PEM), and the aggregator's registry of
    # client public keys (JSON from `fedq keys new`). With a registry, unsigned updates are refused.
    signing_key: str = ""
    client_keys: str = ""
    # Central DP: a secret the aggregators of a run share, from which each round's noise is drawn
    # (a driver that takes over draws the same noise). Unset: fresh OS entropy each round.
    dp_noise_key: str = field(default="", repr=False)  # a secret: kept out of reprs and logs

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from FEDQ_<FIELD> variables, then non-None keyword overrides."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"FEDQ_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            values[f.name] = _convert(f.name, raw, type(getattr(cls(), f.name)))
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown settings: {sorted(unknown)}")
        settings = cls(**values)
        settings.validate()
        return settings.with_credentials()

    def with_credentials(self) -> Settings:
        """With redis_password_file set: redis_url carrying redis_username and the file's password
        (replacing any credentials in it, so doing it twice changes nothing)."""
        if not self.redis_password_file:
            return self
        try:
            password = Path(self.redis_password_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"FEDQ_REDIS_PASSWORD_FILE {self.redis_password_file!r} is unreadable: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
        if not password:
            raise ConfigError(f"FEDQ_REDIS_PASSWORD_FILE {self.redis_password_file!r} is empty")
        parts = urlsplit(self.redis_url)
        host = parts.netloc.rpartition("@")[2]
        userinfo = f"{quote(self.redis_username, safe='')}:{quote(password, safe='')}"
        return replace(self, redis_url=urlunsplit(parts._replace(netloc=f"{userinfo}@{host}")))

    def with_(self, **changes: Any) -> Settings:
        """Copy with some fields changed."""
        return replace(self, **changes)

    def validate(self) -> None:
        """Raise ConfigError on values no process could work with."""
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                f"FEDQ_REDIS_URL must start with redis://, rediss:// or unix://, got {self.redis_url!r}")
        for name in ("block_seconds", "socket_timeout", "connect_timeout", "wait_seconds", "lease_seconds",
                     "heartbeat_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.redis_username and not self.redis_password_file:
            raise ConfigError("FEDQ_REDIS_USERNAME needs FEDQ_REDIS_PASSWORD_FILE (the user's password)")
        if self.redis_password_file and not self.redis_url.startswith(("redis://", "rediss://")):
            raise ConfigError("FEDQ_REDIS_PASSWORD_FILE needs a redis:// or rediss:// URL")
        for name in ("tls_ca_cert", "tls_cert", "tls_key", "signing_key", "client_keys", "redis_password_file"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ConfigError(f"FEDQ_{name.upper()}: no such file {path!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("FEDQ_TLS_CERT and FEDQ_TLS_KEY go together")
        if (self.tls_ca_cert or self.tls_cert) and not self.redis_url.startswith("rediss://"):
            raise ConfigError("TLS files are set but FEDQ_REDIS_URL is not a rediss:// URL")
        if self.max_pushes_per_round < 1:
            raise ConfigError(f"max_pushes_per_round must be at least 1, got {self.max_pushes_per_round}")
        if not 0 <= self.max_model_file_bytes <= 512 * 1024 * 1024:  # Redis's cap on one value
            raise ConfigError("max_model_file_bytes must be 0 (never store) to 536870912 (512 MiB), "
                              f"got {self.max_model_file_bytes}")
        if self.chunk_bytes < 0 or 0 < self.chunk_bytes < 1024:
            raise ConfigError(f"chunk_bytes must be 0 (never split) or at least 1024, got {self.chunk_bytes}")
        if self.lease_seconds < 3 * self.block_seconds:
            # The driver renews between blocking calls; it must get several chances per lease.
            raise ConfigError("lease_seconds must be at least 3 x block_seconds")
        if self.socket_timeout <= self.block_seconds:
            # redis-py would time the socket out in the middle of our own blocking calls.
            raise ConfigError("socket_timeout must exceed block_seconds")


def _convert(name: str, raw: str, kind: type) -> Any:
    try:
        if kind is bool:
            return raw.strip().lower() in ("1", "true", "yes", "on")
        return kind(raw)
    except ValueError:
        raise ConfigError(f"FEDQ_{name.upper()}={raw!r} is not a valid {kind.__name__}") from None
