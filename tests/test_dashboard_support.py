"""Kept only so test files written against the old name keep importing: the dashboard's support
lives in support.dashboard, processes in support.procs, waiting in support.wait, CLI federations
in support.federation. Remove once no file imports it."""

from support.dashboard import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, Dashboard, get_json, http_get, make_run  # noqa: F401
from support.procs import Proc  # noqa: F401
