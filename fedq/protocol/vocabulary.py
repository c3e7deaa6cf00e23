"""The protocol's words, defined once: run statuses and phases, events, outcomes and refusal reasons.

Python uses these enums; the Lua steps (fedq.protocol.scripts) get the same values through a
prelude generated from them, so a script names ``STATUS_RUNNING``, never ``'running'``
(tests/test_vocabulary.py fails on a bare literal in a script). They are ``StrEnum``s: a value
compares equal to its string, which is what Redis, JSON and the dashboard see.
"""

from __future__ import annotations

from enum import StrEnum

# How updates travel (fedq.protocol.compress): whole, or as float16 / int8 deltas.
ENCODINGS: tuple[str, ...] = ("none", "float16", "int8")


class Status(StrEnum):
    """A run's status (the state hash's `status`)."""

    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"


ENDED = (Status.FINISHED, Status.FAILED)


class Phase(StrEnum):
    """Where a run is within its status (the state hash's `phase`)."""

    JOIN = "join"  # clients ask to join; the aggregator admits them and combines their statistics
    TRAIN = "train"  # rounds: clients push updates, the aggregator commits the next global model
    EVAL = "eval"  # after the last round: clients evaluate the last global model
    DONE = "done"


class Event(StrEnum):
    """Entries of a run's event stream (and of the global one), which clients block on."""

    CREATED = "created"
    STARTED = "started"
    ADMITTED = "admitted"
    TRAINING = "training"
    ROUND = "round"
    EVALUATE = "evaluate"
    FINISHED = "finished"
    FAILED = "failed"
    RELEASED = "released"
    SECAGG = "secagg"  # the aggregator published a secure-aggregation record (round, stage)


class Join(StrEnum):
    """Answers to a join request (RunStore.join, RunStore.wait_admitted)."""

    REQUESTED = "requested"  # filed: the aggregator admits (or refuses) it
    JOINED = "joined"
    REJOINED = "rejoined"
    RUN_FULL = "run_full"
    RUN_FINISHED = "run_finished"
    RUN_FAILED = "run_failed"
    NO_SUCH_RUN = "no_such_run"
    TIMEOUT = "join_timeout"


class Push(StrEnum):
    """Answers to a push of an update or an evaluation (the push scripts)."""

    OK = "ok"
    NO_SUCH_RUN = "no_such_run"
    RUN_NOT_TRAINING = "run_not_training"
    RUN_NOT_EVALUATING = "run_not_evaluating"
    UNKNOWN_CLIENT = "unknown_client"
    ROUND_CLOSED = "round_closed"
    ROUND_NOT_OPEN = "round_not_open"
    WRONG_ROUND = "wrong_round"
    NOT_SELECTED = "not_selected"
    TOO_LARGE = "too_large"
    STALE = "stale"  # buffered: trained from a version more than max_staleness behind
    ALREADY_FOLDED = "already_folded"  # buffered: this base version's update is in a committed version
    MALFORMED = "malformed"  # no staged bytes to push, or not a string (never fedq's own client)


class Refusal(StrEnum):
    """Why the aggregator refused an update, an evaluation or a join request (recorded with
    the run's refusals and counted by fedq_updates_refused_total{reason})."""

    BAD_COMPRESSION = "bad_compression"
    BAD_METRICS = "bad_metrics"
    BAD_NUM_EXAMPLES = "bad_num_examples"
    BAD_PART = "bad_part"
    BAD_PARTS = "bad_parts"
    BAD_SCALES = "bad_scales"
    BAD_SIGNATURE = "bad_signature"
    MALFORMED = "malformed"  # the client's key itself: wrong type, sequence number, push id
    NON_FINITE = "non_finite"
    NOT_SELECTED = "not_selected"
    TOO_LARGE = "too_large"
    TOO_MANY_PUSHES = "too_many_pushes"
    UNDECODABLE = "undecodable"
    UNKNOWN_CLIENT = "unknown_client"
    UNKNOWN_KEY = "unknown_key"
    UNSIGNED = "unsigned"
    WRONG_CLIENT = "wrong_client"
    WRONG_DTYPE = "wrong_dtype"
    WRONG_ROUND = "wrong_round"
    WRONG_RUN = "wrong_run"
    WRONG_SHAPE = "wrong_shape"
    # buffered aggregation
    STALE = "stale"
    ALREADY_FOLDED = "already_folded"
    # join requests
    BAD_STATS = "bad_stats"
    SHARD_PLAN = "shard_plan"


JOIN_REFUSALS = (Refusal.BAD_STATS, Refusal.SHARD_PLAN, Refusal.UNKNOWN_KEY)


class Read(StrEnum):
    """What the update guard (scripts.READ_UPDATE) found under a client's update key."""

    OK = "ok"
    NONE = "none"
    SEEN = "seen"  # the version already judged: nothing sent
    CAPPED = "capped"  # not the one version the read allowed (a client at its cap): nothing sent
    WRONG_TYPE = "wrong_type"
    BAD_SEQ = "bad_seq"
    TOO_LARGE = "too_large"
    BAD_PARTS = "bad_parts"
    NO_BODY = "no_body"  # a sequence number with no bytes behind it (not pushed by PUSH)


def lua_prelude() -> str:
    """Lua locals naming every word above (STATUS_RUNNING = 'running', ...), prepended to
    every script so that Python and Lua share one definition."""
    lines = []
    for prefix, enum in (("STATUS", Status), ("PHASE", Phase), ("EVENT", Event), ("JOIN", Join),
                         ("PUSH", Push), ("REFUSAL", Refusal), ("READ", Read)):
        for member in enum:
            lines.append(f"local {prefix}_{member.name} = '{member.value}'")
    return "\n".join(lines) + "\n"
