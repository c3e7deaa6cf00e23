"""Kept only so test files written against the old name keep importing: everything lives in the
support package now (import from ``support.*`` in new tests). Remove once no file imports it."""

from support.data import SEED_DATA_ENV, SEED_DATA_MISSING, seed_data_dir  # noqa: F401
from support.procs import ROOT, cli_env, fedq_cmd  # noqa: F401
from support.redis import RedisServer, free_port  # noqa: F401
