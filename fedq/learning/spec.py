"""The run spec: everything that defines one federation, stored in Redis so clients read it."""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from fedq.errors import ConfigError
from fedq.learning import choices, privacy, staleness
from fedq.learning.dataspec import DataSpec
from fedq.learning.models import check_model_arg
from fedq.learning.strategies import StrategySpec, sample_size
from fedq.protocol.compress import ENCODINGS
from fedq.protocol.keys import check_run_id
from fedq.protocol.secagg.params import SecAggParams
from fedq.protocol.store import RunStore

MAX_CLIENTS = 10_000
OPTIMIZERS = choices.OPTIMIZERS
AGGREGATIONS = choices.AGGREGATIONS
DEFAULT_MAX_STALENESS = choices.DEFAULT_MAX_STALENESS  # versions


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus random hex."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


@dataclass(frozen=True)
class RunSpec:
    """One federation: its clients, rounds, local training, model, data and seed."""

    clients: int = 2
    rounds: int = 5
    local_epochs: int = 5
    batch_size: int = 32
    optimizer: str = "adam"
    learning_rate: float = 0.01
    model: str = "seed"
    data: DataSpec = field(default_factory=DataSpec)
    seed: int = 0
    # A round closes when all clients have answered, or at this deadline (seconds) when at
    # least min_clients have; below the quorum it waits again, round_retries more times.
    round_timeout: float = 3600.0
    min_clients: int | None = None  # None: all clients
    round_retries: int = 2
    # Keep every round's updates in Redis (for audit and replay) instead of deleting them.
    keep_updates: bool = False
    run_id: str = field(default_factory=new_run_id)
    # How updates become the next global model (fedq.learning.strategies), and FedProx's client term.
    strategy: StrategySpec = field(default_factory=StrategySpec)
    # Share of the joined clients that train in a round (a seeded choice per round; 1: all).
    fraction_fit: float = 1.0
    # Differential privacy (fedq.learning.privacy): "off", "central" (the aggregator clips and adds noise)
    # or "local" (each client does, before pushing); clip norm C, noise multiplier z, and the
    # delta the accountant reports epsilon for.
    dp: str = "off"
    dp_clip: float | None = None
    dp_noise: float | None = None
    dp_delta: float = privacy.DEFAULT_DELTA
    # How clients send updates: float32 weights ("none"), or their delta from the round's global
    # model as float16 or as 8-bit codes with a scale per block (fedq.protocol.compress).
    compression: str = "none"
    # Evaluate each round's global model on the held-out test split in the aggregator. Off,
    # the aggregator never loads TensorFlow and, with a plain-mean strategy, holds no model but
    # its float64 sum (how models of a gigabyte and more are federated); rounds then report
    # no test metrics (federated evaluation, --val-fraction, still works).
    central_eval: bool = True
    # The largest share of a round's mean any one update may carry (None: no cap): sample counts
    # are the clients' own claims, so a client claiming 10^9 rows would otherwise capture the mean.
    max_client_share: float | None = None
    # Secure aggregation (fedq.protocol.secagg, SecAgg+): the aggregator and Redis see masked
    # updates only, and their sum. neighbours None: every other client of the round; threshold
    # None: just over half of neighbours + 1; clip and bits: the fixed point of the updates.
    secure_aggregation: bool = False
    secagg_neighbours: int | None = None
    secagg_threshold: int | None = None
    secagg_clip: float = 8.0
    secagg_bits: int = 22
    # How updates become the next model: "sync" rounds (every chosen client answers, then one
    # commit), or "buffered" (FedBuff, fedq.learning.staleness): clients train from the newest
    # version and push when done; every buffer_size accepted updates make the next version, and
    # --rounds counts versions. Updates more than max_staleness versions old are refused.
    aggregation: str = "sync"
    buffer_size: int | None = None  # None: half the clients, rounded up
    max_staleness: int | None = None  # None: DEFAULT_MAX_STALENESS
    staleness_weight: str | None = None  # None: staleness.DEFAULT_WEIGHT

    def validate(self) -> RunSpec:
        """Raise ConfigError naming the first bad field; return self for chaining."""
        check_run_id(self.run_id)
        if not 1 <= self.clients <= MAX_CLIENTS:
            raise ConfigError(f"clients must be between 1 and {MAX_CLIENTS}, got {self.clients}")
        if self.rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {self.rounds}")
        if self.local_epochs < 1:
            raise ConfigError(f"local epochs must be at least 1, got {self.local_epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning rate must be positive, got {self.learning_rate}")
        if not self.round_timeout > 0:
            raise ConfigError(f"round timeout must be positive, got {self.round_timeout}")
        if self.min_clients is not None and not 1 <= self.min_clients <= self.clients:
            raise ConfigError(f"min clients must be between 1 and clients ({self.clients}), got {self.min_clients}")
        if self.round_retries < 0:
            raise ConfigError(f"round retries must be 0 or more, got {self.round_retries}")
        if isinstance(self.fraction_fit, bool) or not isinstance(self.fraction_fit, (int, float)) \
                or not 0.0 < self.fraction_fit <= 1.0:
            raise ConfigError(f"fraction fit must be above 0 and at most 1, got {self.fraction_fit!r}")
        if not isinstance(self.compression, str) or self.compression not in ENCODINGS:
            raise ConfigError(f"unknown compression {self.compression!r}; choose one of {', '.join(ENCODINGS)}")
        if not isinstance(self.central_eval, bool):
            raise ConfigError(f"central_eval must be true or false, got {self.central_eval!r}")
        if self.max_client_share is not None and (
                isinstance(self.max_client_share, bool) or not isinstance(self.max_client_share, (int, float))
                or not 0.0 < self.max_client_share <= 1.0):
            raise ConfigError(f"max client share must be above 0 and at most 1, got {self.max_client_share!r}")
        if self.max_client_share is not None and self.central_dp is not None:
            raise ConfigError("--max-client-share has no effect with --dp central (every update weighs the same)")
        self._check_secagg()  # before the strategy's own checks: its refusal is the clearer reason
        check_model_arg(self.model)
        self.strategy.validate(self.clients_per_round)
        privacy.validate(self.dp, self.dp_clip, self.dp_noise, self.dp_delta, clients=self.clients,
                         combiner=self.strategy.combiner, strategy=self.strategy.name,
                         clip_norm=self.strategy.clip_norm)
        self.data.validate()
        self._check_aggregation()
        return self

    def _check_secagg(self) -> None:
        """ConfigError for secure aggregation's options, and what it cannot be combined with."""
        if not self.secure_aggregation:
            given = [f"--secagg-{n}" for n, v in (("neighbours", self.secagg_neighbours),
                                                  ("threshold", self.secagg_threshold)) if v is not None]
            if given:
                raise ConfigError(f"{' and '.join(given)} {'need' if len(given) > 1 else 'needs'} "
                                  "--secure-aggregation")
            return
        why = "the aggregator sees only the sum of the updates, never one of them"
        if self.aggregation != "sync":
            raise ConfigError(f"--secure-aggregation cannot be used with --aggregation {self.aggregation}: masks "
                              f"cancel only in the sum of one round's planned clients, and a buffered version "
                              f"folds updates one by one as they arrive; use --aggregation sync")
        if self.strategy.combiner != "mean":
            raise ConfigError(f"--secure-aggregation cannot be used with --strategy {self.strategy.name}: it "
                              f"needs every update on its own, and {why}; use a mean-based strategy (fedavg, "
                              f"fedprox, fedavgm, fedadam, fedyogi, fedadagrad)")
        if self.strategy.clip_norm is not None:
            raise ConfigError(f"--secure-aggregation cannot be used with --clip-norm: the aggregator cannot clip "
                              f"an update it never sees ({why}); with --dp central each client clips its own")
        if self.compression != "none":
            raise ConfigError(f"--secure-aggregation cannot be used with --compression {self.compression}: "
                              f"updates travel as masked fixed-point integers (--secagg-bits)")
        if self.max_client_share is not None:
            raise ConfigError(f"--secure-aggregation cannot be used with --max-client-share: it needs each "
                              f"client's weight, and {why}; sample counts are capped by max_weight instead")
        n = self.clients_per_round
        params = self.secagg_params().check(n)
        if min(self.quorum, n) < params.reconstruction_threshold:
            raise ConfigError(f"--min-clients {self.quorum} is below the secure-aggregation threshold "
                              f"{params.reconstruction_threshold}: such a round could never be unmasked")

    def secagg_params(self) -> SecAggParams:
        """Secure aggregation's parameters for the clients planned per round (defaults filled in)."""
        n = self.clients_per_round
        k = self.secagg_neighbours if self.secagg_neighbours is not None else max(n - 1, 1)
        t = self.secagg_threshold if self.secagg_threshold is not None else (k + 1) // 2 + 1
        if isinstance(self.secagg_bits, bool) or not isinstance(self.secagg_bits, int):
            raise ConfigError(f"secagg bits must be a whole number, got {self.secagg_bits!r}")
        return SecAggParams.from_options(neighbours=k, threshold=t, clip=float(self.secagg_clip),
                                         bits=self.secagg_bits)

    def _check_aggregation(self) -> None:
        """ConfigError for a bad aggregation mode, or a combination buffering cannot serve."""
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"unknown aggregation {self.aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
        if not self.buffered:
            given = [n for n in ("buffer_size", "max_staleness", "staleness_weight") if getattr(self, n) is not None]
            if given:
                raise ConfigError(f"{', '.join(n.replace('_', ' ') for n in given)} needs --aggregation buffered")
            return
        staleness.check_buffered(self.clients, self.buffer_k, self.staleness_limit, self.staleness_kind)
        # Each needs a whole round of updates at once, or a fixed number of them per step.
        whole_round = {"median": "a coordinate-wise median", "trimmed": "a trimmed mean", "krum": "Krum's scores"}
        if self.strategy.combiner in whole_round:
            raise ConfigError(f"--strategy {self.strategy.name} needs {whole_round[self.strategy.combiner]} over a "
                              f"whole round's updates; buffered aggregation folds them one by one (use fedavg, "
                              f"fedprox, fedavgm, fedadam, fedyogi or fedadagrad, or --aggregation sync)")
        refused = {
            "dp central": (self.dp == "central", "calibrates its noise to a fixed number of clients per round"),
            "--fraction-fit": (self.fraction_fit < 1.0, "samples the clients of each round; buffered clients all "
                                                        "train continuously"),
            "--max-client-share": (self.max_client_share is not None, "caps shares of a whole round's mean"),
            "--min-clients": (self.min_clients is not None, "sets a round's quorum; a version needs --buffer-size "
                                                            "updates"),
        }
        for what, (bad, why) in refused.items():
            if bad:
                raise ConfigError(f"{what} cannot be used with --aggregation buffered: it {why}")

    @property
    def buffered(self) -> bool:
        """True for buffered asynchronous aggregation (FedBuff), False for synchronous rounds."""
        return self.aggregation == "buffered"

    @property
    def buffer_k(self) -> int:
        """Updates per model version (buffered): buffer_size, or half the clients rounded up."""
        return self.buffer_size if self.buffer_size is not None else (self.clients + 1) // 2

    @property
    def staleness_limit(self) -> int:
        """The most versions an update may lag the newest and still be folded (buffered; sync: 0)."""
        if not self.buffered:
            return 0
        return self.max_staleness if self.max_staleness is not None else DEFAULT_MAX_STALENESS

    @property
    def staleness_kind(self) -> str:
        """The staleness weight s(tau) (fedq.learning.staleness.WEIGHTS)."""
        return self.staleness_weight or staleness.DEFAULT_WEIGHT

    @property
    def central_dp(self) -> privacy.CentralDP | None:
        """Central DP's clip, noise multiplier and fixed denominator (the clients planned per
        round); None unless dp is central."""
        if self.dp != "central" or self.dp_clip is None or self.dp_noise is None:
            return None
        return privacy.CentralDP(self.dp_clip, self.dp_noise, self.clients_per_round)

    def privacy_metrics(self, round_no: int) -> dict[str, Any]:
        """epsilon (at dp_delta) spent after round_no rounds, for the round's record ({}: no DP)."""
        if self.dp == "off" or self.dp_clip is None or self.dp_noise is None:
            return {}
        return privacy.round_metrics(self.dp, self.dp_clip, self.dp_noise, self.dp_delta, round_no,
                                     self.clients_per_round)

    @property
    def clients_per_round(self) -> int:
        """Clients that train in each round: all, or the --fraction-fit sample of them."""
        return sample_size(self.clients, self.fraction_fit)

    @property
    def sampled(self) -> bool:
        """True when rounds train a sample of the clients (the aggregator publishes who)."""
        return self.clients_per_round < self.clients

    @property
    def quorum(self) -> int:
        """Updates a round needs at its deadline (min_clients, or all clients)."""
        return self.clients if self.min_clients is None else self.min_clients

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for msgpack/JSON."""
        out = asdict(self)
        out["data"] = self.data.to_dict()
        out["strategy"] = self.strategy.to_dict()
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> RunSpec:
        """Inverse of to_dict; unknown fields are an error (a newer writer, or a typo)."""
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"run spec has unknown fields: {sorted(unknown)}")
        values = dict(raw)
        values["data"] = DataSpec.from_dict(values.get("data") or {})
        values["strategy"] = StrategySpec.from_dict(values.get("strategy") or {})
        if isinstance(values.get("fraction_fit"), int) and not isinstance(values["fraction_fit"], bool):
            values["fraction_fit"] = float(values["fraction_fit"])  # JSON gives 1 for 1.0
        for n in ("dp_clip", "dp_noise", "dp_delta", "secagg_clip"):
            if isinstance(values.get(n), int) and not isinstance(values[n], bool):
                values[n] = float(values[n])
        return cls(**values)


def load_spec(store: RunStore) -> RunSpec:
    """The spec of the run behind store (RunNotFound when there is none)."""
    return RunSpec.from_dict(store.spec_record())
