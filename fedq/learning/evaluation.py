"""Evaluation metrics (numpy and scikit-learn; no Redis, no Keras).

Central evaluation: the aggregator measures each new global model on the test split no client
trains on: loss and accuracy, and for binary tasks ROC AUC, precision, recall and F1
(scikit-learn's definitions; class 1 is the positive class).

Federated evaluation: every client measures the global model it receives on its own held-out
validation rows and reports loss, accuracy and the number of rows (binary tasks: also its
confusion counts); the aggregator combines them weighted by rows, and precision, recall and F1
from the summed counts, so the federated figures are exactly those of the pooled rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from fedq.errors import UpdateRejected

EVAL_KEYS = ("eval_loss", "eval_accuracy", "eval_examples")
COUNT_KEYS = ("eval_tp", "eval_fp", "eval_fn", "eval_tn")
MAX_EVAL_BYTES = 4096


def to_probabilities(raw: np.ndarray, num_classes: int) -> np.ndarray:
    """(n, C) class probabilities from a model's output: softmax rows, or one sigmoid column."""
    out = np.asarray(raw, dtype=np.float64)
    if out.ndim == 1:
        out = out.reshape(-1, 1)
    if out.shape[1] == 1 and num_classes == 2:
        p = np.clip(out[:, 0], 0.0, 1.0)
        return np.stack([1.0 - p, p], axis=1)
    if out.shape[1] != num_classes:
        raise ValueError(f"the model outputs {out.shape[1]} values per row for {num_classes} classes")
    return out


def confusion(probs: np.ndarray, y: np.ndarray) -> dict[str, int]:
    """tp, fp, fn, tn of a binary task (class 1 positive, predicted by argmax)."""
    pred = probs.argmax(axis=1)
    y = np.asarray(y)
    return {"tp": int(((pred == 1) & (y == 1)).sum()), "fp": int(((pred == 1) & (y == 0)).sum()),
            "fn": int(((pred == 0) & (y == 1)).sum()), "tn": int(((pred == 0) & (y == 0)).sum())}


def _ratios(tp: float, fp: float, fn: float) -> dict[str, float]:
    """precision, recall, F1 from counts (0 where undefined, as scikit-learn's zero_division=0)."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def classification_metrics(probs: np.ndarray, y: np.ndarray) -> dict[str, float | None]:
    """loss, accuracy; binary tasks add auc (None with one class present), precision, recall, f1."""
    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        return {"loss": math.nan, "accuracy": math.nan}
    picked = np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0)
    out: dict[str, float | None] = {"loss": float(-np.log(picked).mean()),
                                    "accuracy": float((probs.argmax(axis=1) == y).mean())}
    if probs.shape[1] == 2:
        from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

        pred = probs.argmax(axis=1)
        out["auc"] = float(roc_auc_score(y, probs[:, 1])) if len(np.unique(y)) == 2 else None
        out["precision"] = float(precision_score(y, pred, zero_division=0))
        out["recall"] = float(recall_score(y, pred, zero_division=0))
        out["f1"] = float(f1_score(y, pred, zero_division=0))
    return out


def client_metrics(probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """What a client reports about the global model on its validation rows (eval_* numbers)."""
    m = classification_metrics(probs, y)
    loss, accuracy = m["loss"], m["accuracy"]
    assert loss is not None and accuracy is not None  # only auc can be None
    out = {"eval_loss": float(loss), "eval_accuracy": float(accuracy), "eval_examples": float(len(y))}
    if probs.shape[1] == 2:
        out.update({f"eval_{k}": float(v) for k, v in confusion(probs, y).items()})
    return out


def combine(items: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """fed_eval_* of several clients' eval_* reports: row-weighted loss and accuracy, pooled counts."""
    rows = loss = acc = 0.0
    counts = dict.fromkeys(COUNT_KEYS, 0.0)
    with_counts = True
    for m in items:
        n = m.get("eval_examples")
        if not n or "eval_loss" not in m or "eval_accuracy" not in m:
            continue
        rows += n
        loss += m["eval_loss"] * n
        acc += m["eval_accuracy"] * n
        if all(k in m for k in COUNT_KEYS):
            for k in COUNT_KEYS:
                counts[k] += m[k]
        else:
            with_counts = False
    if rows == 0:
        return {}
    out = {"fed_eval_loss": loss / rows, "fed_eval_accuracy": acc / rows, "fed_eval_examples": int(rows)}
    if with_counts and sum(counts.values()) > 0:
        out.update({f"fed_eval_{k}": v for k, v in _ratios(counts["eval_tp"], counts["eval_fp"],
                                                             counts["eval_fn"]).items()})
    return out


# --- the final evaluation message (the last global model has no next round to ride on) ------
def encode_eval(run_id: str, round_no: int, client_id: str, metrics: Mapping[str, float]) -> bytes:
    """JSON of one client's evaluation of the global model after round_no."""
    return json.dumps({"run": run_id, "round": int(round_no), "client": client_id,
                       "metrics": {k: float(v) for k, v in metrics.items()}}).encode()


def validate_eval(raw: bytes, *, run_id: str, round_no: int, client_id: str,
                  max_examples: int | None) -> dict[str, float]:
    """The metrics of an evaluation message; UpdateRejected(reason, detail) when anything is wrong."""
    if len(raw) > MAX_EVAL_BYTES:
        raise UpdateRejected("too_large", f"evaluation of {len(raw)} bytes exceeds {MAX_EVAL_BYTES}")
    try:
        msg = json.loads(raw)
    except ValueError as exc:
        raise UpdateRejected("undecodable", f"evaluation is not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise UpdateRejected("undecodable", "evaluation is not a JSON object")
    if msg.get("run") != run_id or msg.get("client") != client_id or msg.get("round") != round_no:
        raise UpdateRejected("wrong_round", f"evaluation names run {msg.get('run')!r}, round {msg.get('round')!r}, "
                                            f"client {msg.get('client')!r}")
    return check_eval_metrics(msg.get("metrics"), max_examples)


def check_eval_metrics(metrics: Any, max_examples: int | None) -> dict[str, float]:
    """The eval_* numbers of a client's report, checked; UpdateRejected when they cannot be true."""
    if not isinstance(metrics, dict) or not all(k in metrics for k in EVAL_KEYS):
        raise UpdateRejected("bad_metrics", f"evaluation must carry {', '.join(EVAL_KEYS)}")
    out: dict[str, float] = {}
    for k in (*EVAL_KEYS, *COUNT_KEYS):
        if k not in metrics:
            continue
        v = metrics[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise UpdateRejected("bad_metrics", f"evaluation metric {k!r} is not a finite number >= 0: {v!r}")
        out[k] = float(v)
    n = out["eval_examples"]
    if n < 1 or n != int(n) or (max_examples is not None and n > max_examples):
        raise UpdateRejected("bad_num_examples", f"evaluated on {n:g} rows (holds {max_examples} validation rows)")
    if out["eval_accuracy"] > 1:
        raise UpdateRejected("bad_metrics", f"accuracy {out['eval_accuracy']:g} exceeds 1")
    if any(k in out for k in COUNT_KEYS) and sum(out.get(k, 0.0) for k in COUNT_KEYS) != n:
        raise UpdateRejected("bad_metrics", "confusion counts do not add up to the rows evaluated")
    return out
