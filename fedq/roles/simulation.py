"""In-process simulation: a federation's math without Redis or processes, for experiments and tests.

It uses the pieces a real run uses (the data split and partition, the federated scaler,
``KerasTrainer``, ``fedq.learning.strategies``, client sampling and the central evaluation), in one
process and in round order, so comparing strategies over many seeds takes seconds per run.
What it leaves out is the round protocol itself (pushes, quorum, commits), which the
Redis-backed tests cover. Attackers replace an honest client's update with their own. With a
spec's compression, each update goes through the real encoding and the aggregator's
validation and reconstruction (``fedq.protocol.messages``), so its error is the one a real run sees.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedq.learning import privacy
from fedq.learning.data import load_dataset, split_indices
from fedq.learning.evaluation import combine
from fedq.learning.models import build_model, evaluate, weight_names
from fedq.learning.partition import load_client_data
from fedq.learning.scaling import combine_stats, feature_stats, scaler_from_stats, standardize
from fedq.learning.spec import RunSpec
from fedq.learning.strategies import Strategy, select_clients
from fedq.learning.trainer import KerasTrainer
from fedq.protocol import messages

# (trained tensors, global tensors, rng) -> the tensors the attacker sends instead
Attack = Callable[[list[np.ndarray], list[np.ndarray], np.random.Generator], list[np.ndarray]]


def scaled_update(factor: float) -> Attack:
    """Send the honest update (model - global) multiplied by factor (e.g. -10: a sign-flip boost)."""
    def attack(tensors: list[np.ndarray], global_: list[np.ndarray], _rng: np.random.Generator) -> list[np.ndarray]:
        return [(g + factor * (t.astype(np.float64) - g)).astype(t.dtype) for t, g in zip(tensors, global_)]
    return attack


def gaussian_noise(std: float) -> Attack:
    """Send the global model plus Gaussian noise of this standard deviation."""
    def attack(tensors: list[np.ndarray], global_: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        return [(g + rng.normal(0.0, std, np.shape(g))).astype(t.dtype) for t, g in zip(tensors, global_)]
    return attack


@dataclass
class Federation:
    """A spec's clients, data and model, built once and reused across simulated runs."""

    spec: RunSpec
    trainers: list[Any]
    val: list[tuple[np.ndarray, np.ndarray]]
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    model: Any
    initial: list[np.ndarray]
    label_counts: list[list[int]] = field(default_factory=list)

    @classmethod
    def build(cls, spec: RunSpec, trainer_factory: Callable[..., Any] = KerasTrainer) -> Federation:
        """Load every client's shard, the federated scaler, one trainer per client and the model."""
        spec.validate()
        ds = load_dataset(spec.data)
        _, test_idx = split_indices(ds.y, spec.data.test_fraction, spec.data.seed)
        parts = [load_client_data(spec.data, k, spec.clients) for k in range(spec.clients)]
        mean, std = scaler_from_stats(combine_stats([feature_stats(p.x) for p in parts]))
        stop = threading.Event()
        trainers = [trainer_factory(spec, ds.num_features, ds.num_classes, standardize(p.x, mean, std), p.y, k, stop)
                    for k, p in enumerate(parts)]
        model = build_model(spec.model, ds.num_features, ds.num_classes, spec.seed)
        return cls(spec=spec, trainers=trainers, val=[(standardize(p.x_val, mean, std), p.y_val) for p in parts],
                   x_test=standardize(ds.x[test_idx], mean, std), y_test=ds.y[test_idx], num_classes=ds.num_classes,
                   model=model, initial=[np.array(w) for w in model.get_weights()],
                   label_counts=[p.label_counts() for p in parts])

    def run(self, spec: RunSpec | None = None, *, rounds: int | None = None,
            attackers: dict[int, Attack] | None = None, target: float | None = None) -> list[dict[str, Any]]:
        """Simulate rounds with spec's strategy (default: the federation's); one record per round.

        With target, stop at the first round whose test accuracy reaches it. The training
        settings (epochs, batch, optimizer, mu) are the trainers', i.e. the build spec's."""
        spec = spec or self.spec
        rounds = rounds or spec.rounds
        attackers = attackers or {}
        rng = np.random.default_rng([spec.seed, 99])
        strategy = Strategy(spec.strategy, self.initial, dp=spec.central_dp)
        ids = [f"client-{k}" for k in range(len(self.trainers))]
        global_ = [np.array(w) for w in self.initial]
        names = weight_names(self.model)
        template = messages.template_of(names, global_)
        out: list[dict[str, Any]] = []
        for round_no in range(1, rounds + 1):
            t0 = time.perf_counter()
            chosen = select_clients(ids, spec.fraction_fit, spec.seed, round_no)
            # DP noise from the seed: reproducible experiments (a real run keeps its noise secret).
            noise = np.random.default_rng([spec.seed, 0xD9, round_no])
            strategy.begin_round(global_, noise_rng=noise if spec.central_dp is not None else None)
            train_loss, fed_items, errors = [], [], []
            for cid in chosen:
                k = ids.index(cid)
                trainer = self.trainers[k]
                trainer.load(global_)
                x_val, y_val = self.val[k]
                if round_no >= 2 and len(y_val):
                    fed_items.append(trainer.evaluate(x_val, y_val))
                train_loss.append(trainer.train(round_no)["loss"])
                tensors = trainer.weights()
                if spec.dp == "local" and spec.dp_clip is not None and spec.dp_noise is not None:
                    tensors = privacy.privatize(tensors, global_, spec.dp_clip, spec.dp_noise, noise)
                if k in attackers:
                    tensors = attackers[k](tensors, global_, rng)
                if spec.compression != "none":
                    tensors, error = _through_the_wire(spec, round_no, cid, trainer.num_examples, names,
                                                       tensors, global_, template)
                    errors.append(error)
                strategy.add(tensors, trainer.num_examples, cid)
            global_ = strategy.result()
            self.model.set_weights(global_)
            test = evaluate(self.model, self.x_test, self.y_test, self.num_classes)
            if out and fed_items:
                out[-1].update(combine(fed_items))  # the previous model, evaluated by this round's clients
            out.append({"round": round_no, "clients": chosen, "train_loss": float(np.mean(train_loss)),
                        **{f"test_{k}": v for k, v in test.items()}, **strategy.round_info(),
                        **spec.privacy_metrics(round_no),
                        **({"compression_error_max": max(errors)} if errors else {}),
                        "seconds": time.perf_counter() - t0})
            if target is not None and test["accuracy"] >= target:
                break
        return out


def _through_the_wire(spec: RunSpec, round_no: int, cid: str, num_examples: int, names: list[str],
                      tensors: list[np.ndarray], global_: list[np.ndarray],
                      template: list[messages.TensorSpec]) -> tuple[list[np.ndarray], float]:
    """A client's weights compressed, encoded, validated and reconstructed as a real round does;
    returns the weights the aggregator would fold and the client's measured error."""
    packed = messages.compress_update(names, tensors, global_, spec.compression)
    payload = messages.encode_update(spec.run_id, round_no, cid, num_examples, packed.metrics, packed.names,
                                     packed.tensors, None, packed.descriptor)
    upd = messages.validate_update(payload, run_id=spec.run_id, round_no=round_no, client_id=cid,
                                   template=template, compression=spec.compression, base=global_)
    return upd.tensors, packed.metrics["compression_error"]


def rounds_to(records: Sequence[dict[str, Any]], target: float) -> int | None:
    """The first round whose test accuracy reached target (None: never)."""
    return next((r["round"] for r in records if r["test_accuracy"] >= target), None)
