"""Help panels: the titled groups in which `fedq run --help` and its kin list their options."""

from __future__ import annotations

import click

# `fedq run --help` and its kin take forty-odd options: their help lists them in these titled
# panels, in this order (keys are the options' parameter names). An option of a PanelCommand that
# no panel names is listed under OTHER_PANEL; tests/test_cli_help.py keeps that to --help.
HELP_PANELS: dict[str, tuple[str, ...]] = {
    "Data": ("normal_csv", "abnormal_csv", "csv_path", "label_column", "missing_value", "test_fraction",
             "partition", "alpha", "rows_per_client", "features"),
    "Federation": ("clients", "rounds", "fraction_fit", "round_timeout", "min_clients", "round_retries"),
    "Client training": ("local_epochs", "batch_size", "optimizer", "learning_rate", "model", "seed"),
    "Strategy": ("strategy", "server_lr", "server_momentum", "beta1", "beta2", "tau", "mu", "trim_fraction",
                 "byzantine", "krum_keep", "clip_norm", "max_held_mb", "max_client_share"),
    "Privacy": ("dp", "dp_clip", "dp_noise", "dp_delta"),
    "Secure aggregation": ("secure_aggregation", "secagg_neighbours", "secagg_threshold", "secagg_clip",
                           "secagg_bits"),
    "Aggregation": ("aggregation", "buffer_size", "max_staleness", "staleness_weight", "straggler_clients",
                    "straggler_delay"),
    "Evaluation": ("central_eval", "val_fraction"),
    "Transport": ("compression", "keep_updates"),
    "Client": ("shard", "num_shards", "client_id", "once", "delay"),
    "Worker": ("queue", "burst", "metrics_port", "metrics_host"),
    "Run control": ("run_id", "if_absent", "out", "processes"),
}
OTHER_PANEL = "Other options"
_PANEL_OF = {name: title for title, names in HELP_PANELS.items() for name in names}


class PanelCommand(click.Command):
    """A click command whose --help lists its options in the titled panels of HELP_PANELS.

    Only the help changes: parsing, option names and defaults are click's as usual."""

    def panels(self, ctx: click.Context) -> list[tuple[str, list[click.Parameter]]]:
        """(title, parameters) of every non-empty panel, in HELP_PANELS order, OTHER_PANEL last."""
        grouped: dict[str, list[click.Parameter]] = {}
        for param in self.get_params(ctx):
            grouped.setdefault(_PANEL_OF.get(param.name or "", OTHER_PANEL), []).append(param)
        return [(title, grouped[title]) for title in (*HELP_PANELS, OTHER_PANEL) if title in grouped]

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        for title, params in self.panels(ctx):
            records = [rec for rec in (p.get_help_record(ctx) for p in params) if rec is not None]
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)
