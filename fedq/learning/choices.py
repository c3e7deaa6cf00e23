"""The names a run spec chooses among, and their defaults, without the code behind them (no
numpy): the CLI offers them as option choices before it loads any of that code. Each module that
implements a choice takes its names from here (fedq.learning.spec, strategies, privacy,
staleness); tests/test_cli_startup.py checks that the strategies match their implementations."""

from __future__ import annotations

OPTIMIZERS = ("adam", "sgd", "rmsprop", "adagrad")
AGGREGATIONS = ("sync", "buffered")
DEFAULT_MAX_STALENESS = 10  # versions
STALENESS_WEIGHTS = ("inverse-sqrt", "constant", "hinge")
DEFAULT_STALENESS_WEIGHT = "inverse-sqrt"
DP_MODES = ("off", "central", "local")
DEFAULT_DELTA = 1e-5
STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "trimmed-mean",
              "krum", "multi-krum")
