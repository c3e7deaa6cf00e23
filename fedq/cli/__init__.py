"""Command line: thin wrappers that parse options and call library functions.

This module holds the `fedq` group (pyproject's console script) and adds the commands to it; they
live in modules by concern: launch (run, simulate), workers (submit, aggregator, client), views
(status, dashboard, report), access (keys, acl) and fedq.ops.k8s (k8s, kfp), with the options they
share in options, what they make of them in parsing, and the help's panels in panels. A command
imports what it runs inside its function, so that parsing options stays cheap.
"""

from __future__ import annotations

import logging
import sys

import click

from fedq.cli.access import acl_cmd, keys_group
from fedq.cli.launch import run, sim_worker, simulate
from fedq.cli.views import dashboard, report, status
from fedq.cli.workers import aggregator, client, submit
from fedq.clitools import fail_cleanly
from fedq.ops.k8s import k8s_group, kfp_group
from fedq.settings import Settings


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--redis-url", envvar="FEDQ_REDIS_URL", help="Redis URL (env FEDQ_REDIS_URL).")
@click.option("--log-level", envvar="FEDQ_LOG_LEVEL", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.version_option(package_name="fedq")
@click.pass_context
@fail_cleanly
def main(ctx: click.Context, redis_url: str | None, log_level: str) -> None:
    """fedq: federated learning of a Keras model over Redis."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    ctx.obj = {"settings": Settings.from_env(redis_url=redis_url, log_level=log_level.upper()),
               "redis_from_env": bool(redis_url)}


for _command in (run, submit, aggregator, client, status, dashboard, report, simulate, sim_worker, keys_group,
                 acl_cmd, k8s_group, kfp_group):
    main.add_command(_command)
