"""Preparing to drive a run: the test split, the model, the strategy and the state the rounds
share (``Preparing``, mixed into fedq.roles.aggregator.Aggregator), and the round-0 model."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedq.errors import ConfigError
from fedq.learning import privacy
from fedq.learning.data import load_dataset, split_indices
from fedq.learning.models import build_model, weight_names
from fedq.learning.scaling import standardize
from fedq.learning.spec import RunSpec
from fedq.learning.strategies import Strategy, held_bytes, select_clients
from fedq.protocol import chunking, messages, transfer
from fedq.protocol.store import RunStore
from fedq.roles import initial, secure
from fedq.settings import Settings

log = logging.getLogger("fedq.roles.aggregator")


@dataclass
class Driving:
    """What the rounds of one driving session share (small; the models live in the strategy)."""

    spec: RunSpec
    model: Any  # the Keras model for central evaluation; None without it
    num_classes: int
    template: list[messages.TensorSpec]
    wire: list[messages.TensorSpec]  # what updates must look like (the template, or masked vectors)
    strategy: Strategy
    stream: bool  # the next global model is written slice by slice from the sum (lean, in parts)
    x_test: np.ndarray
    y_test: np.ndarray
    round_no: int  # the last committed round
    global_tensors: list[np.ndarray] | None  # the global model rounds train from (None when lean)
    fed_eval: bool
    round_started: float
    # The members as this driver's close of the last round saw them, once it committed that
    # round itself: the next round opens from them (None: it looks for itself, as on resuming).
    members: list[str] | None = None


@dataclass
class Prepared:
    """What driving a run needs, built before taking the lease (the slow part)."""

    ds: Any
    test_idx: np.ndarray
    model: Any = None  # the Keras model for central evaluation; None without it
    names: list[str] = field(default_factory=list)  # the model's weight names (with a model)
    strategy: Strategy | None = None  # None until the model's shapes are known


class Preparing:
    """The aggregator's preparation of a driving session (mixed into Aggregator)."""

    run_id: str
    settings: Settings
    store: RunStore

    if TYPE_CHECKING:
        def _tick(self) -> None: ...

    def _prepare(self, spec: RunSpec) -> Prepared:
        """The test split, the model and the strategy: everything driving needs, built once.
        Without central evaluation the aggregator has no use for the Keras model: it never
        loads TensorFlow, and the strategy waits for the model's shapes (_strategy_for)."""
        ds = load_dataset(spec.data)
        _, test_idx = split_indices(ds.y, spec.data.test_fraction, spec.data.seed)
        if spec.dp != "off":
            privacy.load_accountant()  # seconds of imports: here, not inside a round's record
        if not spec.central_eval:
            return Prepared(ds, test_idx)
        model = build_model(spec.model, ds.num_features, ds.num_classes, spec.seed)
        weights = model.get_weights()
        return Prepared(ds, test_idx, model, weight_names(model), self._new_strategy(spec, weights))

    def _strategy_for(self, spec: RunSpec, template: list[messages.TensorSpec]) -> Strategy:
        """The strategy for a model known by its shapes alone. The zero tensors cost no memory
        until written: numpy maps large zero arrays lazily, and a streaming strategy never
        writes its template."""
        return self._new_strategy(spec, [np.zeros(t.shape, dtype=np.dtype(t.dtype)) for t in template])

    def _new_strategy(self, spec: RunSpec, weights: list[np.ndarray]) -> Strategy:
        """The run's strategy (with secure aggregation, the masked-sum accumulator in its place)."""
        if spec.secure_aggregation:
            return secure.SecureSum(spec, weights, self.store, self._tick, self.settings.block_seconds)
        strategy = Strategy(spec.strategy, weights, dp=spec.central_dp)
        self._check_memory(spec, strategy, weights)
        return strategy

    def _check_memory(self, spec: RunSpec, strategy: Strategy, template: list[np.ndarray]) -> None:
        """Refuse a run whose robust strategy would hold more than the cap in memory."""
        if not strategy.holds_all:
            return
        n = spec.clients_per_round
        need = held_bytes(template, n)
        cap = spec.strategy.max_held_mb * 2 ** 20
        if need > cap:
            raise ConfigError(
                f"strategy {spec.strategy.name} holds all {n} updates of a round in memory: {n} x "
                f"{need / n / 2 ** 20:.2f} MiB = {need / 2 ** 20:.1f} MiB exceeds the cap of "
                f"{spec.strategy.max_held_mb:g} MiB (--max-held-mb); use fewer clients per round "
                f"(--fraction-fit), a smaller model, or a streaming strategy such as fedavg")

    def _initial_global(self, spec: RunSpec, num_features: int, num_classes: int) -> bytes:
        """Round 0's model: the one the run's submitter stored with it (fedq.roles.initial), else
        built by a child process, so that its building peak never enters this one."""
        submitted = initial.submitted_initial(self.store)
        if submitted is not None:
            log.info("run %s: the initial model came with the run", self.run_id)
            return submitted
        initial.need_tensorflow(self.run_id)
        return initial.build_in_child(self.settings, self.run_id, num_features, num_classes, self._tick)

    def _driving(self, spec: RunSpec, prepared: Prepared, mean: np.ndarray, std: np.ndarray) -> Driving:
        """Everything the rounds share, read from Redis as the last commit left it."""
        ds, model = prepared.ds, prepared.model
        g_tensors: list[np.ndarray] | None = None
        if model is not None:  # the model is read whole anyway: its template comes with it
            round_no, g_names, g_tensors = transfer.read_global(self.store)
            template = messages.template_of(g_names, g_tensors)
        else:
            round_no, template = transfer.global_template(self.store)
        strategy = prepared.strategy or self._strategy_for(spec, template)
        # Lean: no central evaluation, and the next global model is the plain mean of the
        # updates, so no round needs the previous one; when it travels in parts it is written
        # out slice by slice from the float64 sum. Memory: that sum and a part, whatever N is.
        lean = model is None and strategy.streams_result and spec.compression == "none"
        if g_tensors is None and not lean:
            g_tensors = transfer.read_global(self.store)[2]
        # Server optimiser state (momentum, Adam moments) was committed with this global model.
        strategy.load_state(self.store.server_state_payload(), round_no)
        wire = secure.wire_template(template) if spec.secure_aggregation else template
        return Driving(spec=spec, model=model, num_classes=ds.num_classes, template=template, wire=wire,
                        strategy=strategy,
                        stream=lean and chunking.should_chunk(template, self.settings.chunk_bytes),
                        x_test=standardize(ds.x[prepared.test_idx], mean, std), y_test=ds.y[prepared.test_idx],
                        round_no=round_no, global_tensors=g_tensors, fed_eval=spec.data.val_fraction > 0,
                        round_started=time.time())

    def _select(self, spec: RunSpec, round_no: int) -> list[str] | None:
        """The clients chosen for round_no (None: every client trains), from the joined ids."""
        if not spec.sampled:
            return None
        return select_clients(self.store.clients(), spec.fraction_fit, spec.seed, round_no)

    def _noise_rng(self, spec: RunSpec, round_no: int) -> np.random.Generator | None:
        """Central DP: the round's noise source (keyed by FEDQ_DP_NOISE_KEY when set); else None."""
        if spec.central_dp is None:
            return None
        return privacy.noise_rng(self.settings.dp_noise_key, self.run_id, spec.seed, round_no)
