"""Exception hierarchy: every error fedq raises on purpose derives from FedqError."""

from __future__ import annotations


class FedqError(Exception):
    """Root of fedq's own errors; the CLI prints these as one line and exits non-zero."""


class ConfigError(FedqError):
    """A setting, flag or run spec is invalid."""


class CodecError(FedqError):
    """A payload could not be encoded or decoded (names what was wrong)."""


class DataError(FedqError):
    """A dataset could not be loaded or partitioned (missing file, unknown column, bad shard)."""


# Every reason an UpdateRejected carries (what a refusal records, and the `reason` label of
# fedq_updates_refused_total, which starts at 0 for each so that alerts have data from the start).
# tests/test_metrics.py checks that every UpdateRejected raised in fedq/ uses one of these.
class UpdateRejected(FedqError):
    """A client update failed validation; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class RunNotFound(FedqError):
    """No run with the given id exists in Redis."""


class RunFailed(FedqError):
    """A run ended in the failed state."""


class RedisUnavailable(FedqError):
    """Redis could not be reached at the configured URL."""


class SecAggError(FedqError):
    """Secure aggregation cannot produce a correct sum (too few shares, inconsistent shares, bad
    parameters); ``reason`` is a short machine-readable code. Never a wrong result instead."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class RoundTimeout(FedqError):
    """Not all expected messages arrived before the round deadline."""
