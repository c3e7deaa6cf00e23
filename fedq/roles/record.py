"""A round's record (fedq:{run}:metrics, report.json's rounds) and the run's final record, from what
the round folded: pure functions of a judged Round, no Redis."""

from __future__ import annotations

import time
from typing import Any

from fedq.learning.aggregate import weighted_metrics
from fedq.protocol import chunking, messages
from fedq.roles.judging import Round


def round_metrics(rnd: Round, round_no: int, test: dict[str, float], round_started: float,
                  eval_seconds: float) -> dict[str, Any]:
    """The round's record: counts, losses and accuracies, times, refusals, who was missing and why."""
    updates = sorted(rnd.folded.values(), key=lambda u: u.client_id)
    train = weighted_metrics((u.metrics, u.num_examples) for u in updates)
    last = max(updates, key=lambda u: u.metrics.get("push_time", 0.0))
    seconds = time.time() - round_started
    return {
        "round": round_no,
        "num_updates": len(updates),
        "num_examples": rnd.acc.total_examples,
        "train_loss": train.get("loss"),
        "train_accuracy": train.get("accuracy"),
        "test_loss": test.get("loss"),  # None: no central evaluation (--no-central-eval)
        "test_accuracy": test.get("accuracy"),
        "seconds": seconds,
        # Wall time of the round that was neither the last-arriving client's training nor its
        # one-off model set-up (first round only): the cost of the round machinery itself.
        # Never below 0: a client starts training on the commit event, a moment before the
        # driver starts the next round's clock.
        "overhead_seconds": max(0.0, seconds - last.metrics.get("train_seconds", 0.0)
                                - last.metrics.get("setup_seconds", 0.0)),
        "fold_seconds": rnd.fold_seconds,
        "eval_seconds": eval_seconds,
        "refused": len(rnd.refused),
        # Members due an update that the round closed without, and why.
        "missing": {cid: "heartbeat expired" if cid in rnd.gone else "no update by the deadline"
                    for cid in sorted(rnd.selected if rnd.selected is not None else rnd.joined)
                    if cid not in rnd.folded and cid not in rnd.refused},
        # --max-client-share: the weights used where a claimed count was lowered
        "capped_weights": {cid: w for cid, w in sorted(rnd.weights.items())
                           if cid in rnd.folded and w != rnd.folded[cid].num_examples},
        "clients": {u.client_id: {"num_examples": u.num_examples, "digest": u.digest, **u.metrics}
                    for u in updates},
    }


def central_extras(test: dict[str, Any]) -> dict[str, Any]:
    """Central evaluation beyond loss and accuracy (binary tasks: auc, precision, recall, f1)."""
    return {f"test_{k}": v for k, v in test.items() if k not in ("loss", "accuracy")}


def final_record(metrics: dict[str, Any]) -> dict[str, Any]:
    """The run's final record from its last round's metrics."""
    keep = ("test_loss", "test_accuracy", "test_auc", "test_precision", "test_recall", "test_f1",
            "dp_epsilon", "dp_delta")
    return {"round": metrics.get("round"), **{k: metrics[k] for k in keep if k in metrics}}


def compression_summary(rnd: Round, template: list[messages.TensorSpec]) -> dict[str, Any]:
    """Bytes on the wire and compression error of a round's accepted updates.

    payload_bytes are the stored envelopes (metadata included), tensor_bytes the tensors in them,
    float32_bytes what those tensors weigh as the model's own weights; ratio is tensor_bytes /
    float32_bytes. The errors are what the clients measured on their own deltas
    (||decoded - delta|| / ||delta||): reports, which the aggregator has no delta to check against."""
    updates = list(rnd.folded.values())
    model_bytes = chunking.model_bytes(template)
    errors = [u.metrics["compression_error"] for u in updates
              if u.encoding != "none" and "compression_error" in u.metrics]
    tensors = sum(u.tensor_bytes for u in updates)
    raw = model_bytes * len(updates)
    return {
        "encoding": rnd.compression,
        "compressed_updates": sum(u.encoding != "none" for u in updates),
        "payload_bytes": sum(u.payload_bytes for u in updates),
        "tensor_bytes": tensors,
        "float32_bytes": raw,
        "ratio": tensors / raw if raw else None,
        "error_max": max(errors) if errors else None,
        "error_mean": sum(errors) / len(errors) if errors else None,
    }
