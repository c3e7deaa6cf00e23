"""A run's report: report.json, the final model as model.keras, and its input scaler."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedq.errors import FedqError
from fedq.learning.privacy import ACCOUNTANT, GUARANTEES
from fedq.learning.spec import RunSpec, load_spec
from fedq.protocol import messages, transfer
from fedq.protocol.store import RunStore
from fedq.protocol.vocabulary import Status
from fedq.roles.plots import X_AXES, commit_times, write_curves

ROUND_FIELDS = ("round", "num_updates", "num_examples", "train_loss", "train_accuracy",
                "test_loss", "test_accuracy", "seconds", "overhead_seconds")
# Present when the run has them: binary central evaluation, federated evaluation (validation
# rows), the strategy's round facts (clipped clients, Krum's choice), the sampled clients and
# differential privacy (epsilon spent so far at the run's delta; central: the noise std of the mean),
# the bytes and error of the updates' encoding.
EXTRA_ROUND_FIELDS = ("test_auc", "test_precision", "test_recall", "test_f1", "fed_eval_loss",
                      "fed_eval_accuracy", "fed_eval_examples", "fed_eval_precision", "fed_eval_recall",
                      "fed_eval_f1", "strategy", "selected", "dp_epsilon", "dp_delta", "dp_noise_std",
                      "compression", "version", "staleness_mean", "staleness_max", "updates")
FINAL_EXTRAS = ("test_auc", "test_precision", "test_recall", "test_f1", "fed_eval_loss", "fed_eval_accuracy",
                "fed_eval_examples", "fed_eval_precision", "fed_eval_recall", "fed_eval_f1")


def build_report(store: RunStore) -> dict[str, Any]:
    """Everything a user needs to judge a run, as plain JSON-able data."""
    spec = load_spec(store)
    state = store.state()
    rounds = [{k: m.get(k) for k in ROUND_FIELDS} | {k: m[k] for k in EXTRA_ROUND_FIELDS if k in m}
              | {"clients": sorted(m.get("clients", {}))} for m in store.metrics()]
    final = json.loads(state["final"]) if state.get("final") else {}
    return {
        "run_id": store.run_id,
        "status": state.get("status"),
        "reason": state.get("reason"),
        "clients": spec.clients,
        "spec": spec.to_dict(),
        "rounds": rounds,
        "final": {"test_accuracy": final.get("test_accuracy"), "test_loss": final.get("test_loss")},
        # The last model's other figures: binary central metrics and the federated evaluation.
        "final_evaluation": {k: final[k] for k in FINAL_EXTRAS if k in final},
        "strategy": spec.strategy.resolved().to_dict(),
        "privacy": _privacy(spec, rounds),
        "compression": compression_summary(spec.compression, rounds),
        "aggregation": _aggregation(spec, rounds),
        # Each client's shard: training and held-out rows and its label histogram (class order
        # as in scaler.json's class_names), which shows how skewed a partition is.
        "client_data": {cid: {k: rec.get(k) for k in ("shard", "rows", "val_rows", "labels", "partition")}
                        | {"devices": client_devices(rec.get("devices"))}
                        for cid, rec in sorted(store.clients().items())},
        "refused": store.refused(),
        "created_at": _f(state.get("created_at")),
        "started_at": _f(state.get("started_at")),
        "finished_at": _f(state.get("finished_at")),
    }


MAX_DEVICES, MAX_DEVICE_NAME = 64, 128


def client_devices(value: Any) -> list[str] | None:
    """The devices a client says it trained on (its join record: hostile until checked); None
    unless a short list of short names."""
    if not isinstance(value, list) or len(value) > MAX_DEVICES:
        return None
    if not all(isinstance(d, str) and 0 < len(d) <= MAX_DEVICE_NAME and d.isprintable() for d in value):
        return None
    return list(value)


def _aggregation(spec: RunSpec, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Sync rounds, or buffered versions: K, the staleness limit and weight, and the staleness seen."""
    if not spec.buffered:
        return {"mode": spec.aggregation}
    taus = [u["staleness"] for m in rounds for u in m.get("updates") or []]
    return {"mode": spec.aggregation, "buffer_size": spec.buffer_k, "max_staleness": spec.staleness_limit,
            "staleness_weight": spec.staleness_kind, "versions": len(rounds), "updates": len(taus),
            "staleness_mean": sum(taus) / len(taus) if taus else None, "staleness_max": max(taus, default=None)}


def _privacy(spec: RunSpec, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's DP settings and the epsilon spent by its last committed round."""
    if spec.dp == "off":
        return {"mode": "off"}
    spent = [m for m in rounds if m.get("dp_epsilon") is not None]
    return {"mode": spec.dp, "clip": spec.dp_clip, "noise_multiplier": spec.dp_noise, "delta": spec.dp_delta,
            "epsilon": spent[-1]["dp_epsilon"] if spent else None, "rounds": spent[-1]["round"] if spent else 0,
            "accountant": f"dp-accounting {ACCOUNTANT.upper()}, no sampling amplification",
            "guarantee": GUARANTEES[spec.dp]}


def compression_summary(encoding: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's update encoding over all rounds: bytes on the wire (whole envelopes, and their
    tensors against the same tensors as float32), and the relative L2 error of the compressed
    deltas (each client's own measurement; max and mean over the updates)."""
    per = [m["compression"] for m in rounds if isinstance(m.get("compression"), dict)]
    tensors = sum(c.get("tensor_bytes") or 0 for c in per)
    raw = sum(c.get("float32_bytes") or 0 for c in per)
    counted = [c for c in per if c.get("error_max") is not None]
    weights = [c.get("compressed_updates") or 0 for c in counted]
    return {
        "encoding": encoding,
        "payload_bytes": sum(c.get("payload_bytes") or 0 for c in per),
        "tensor_bytes": tensors,
        "float32_bytes": raw,
        "ratio": tensors / raw if raw else None,
        "error_max": max((c["error_max"] for c in counted), default=None),
        "error_mean": sum(c["error_mean"] * w for c, w in zip(counted, weights)) / sum(weights)
        if sum(weights) else None,
    }


def _f(v: str | None) -> float | None:
    return None if v is None else float(v)


def save_model(store: RunStore, out: Path) -> tuple[Path, Path]:
    """Write the run's current global model to out/model.keras and its scaler to out/scaler.json."""
    from fedq.learning.models import build_model, keras_file

    spec = load_spec(store)
    payload, scaler = store.global_payload(), store.scaler_payload()
    if payload is None or scaler is None:
        raise FedqError(f"run {store.run_id} has no global model yet")
    _, _, tensors = transfer.read_global(store, payload)
    mean, std, meta = messages.decode_scaler(scaler)
    model = build_model(spec.model, int(meta["num_features"]), int(meta["num_classes"]), spec.seed)
    model.set_weights([np.array(t) for t in tensors])
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "model.keras"
    model_path.write_bytes(keras_file(model, spec.optimizer, spec.learning_rate))
    # The model expects standardised inputs: ship the statistics it was trained with.
    scaler_path = out / "scaler.json"
    scaler_path.write_text(json.dumps(scaler_document(mean, std, meta, model.input_shape[1:]), indent=2))
    return model_path, scaler_path


def scaler_document(mean: np.ndarray, std: np.ndarray, meta: dict[str, Any],
                    input_shape: tuple[Any, ...] | None = None) -> dict[str, Any]:
    """What scaler.json holds: the input statistics the model was trained with, and how to apply them."""
    shape = f" and reshape to the model's input shape (n, {', '.join(str(d) for d in input_shape)})" \
        if input_shape else ""
    return {"mean": mean.tolist(), "std": std.tolist(), "feature_names": meta.get("feature_names"),
            "class_names": meta.get("class_names"),
            "note": f"standardise inputs as (x - mean) / std, with missing values set to 0{shape}"}


def weights_npz(store: RunStore) -> bytes:
    """The run's global model as a numpy .npz (no TensorFlow needed): arrays '0', '1', ... in the
    order of model.get_weights(), and 'names' (the tensor names), 'round' (the round it is from)."""
    import io

    payload = store.global_payload()
    if payload is None:
        raise FedqError(f"run {store.run_id} has no global model yet")
    round_no, names, tensors = transfer.read_global(store, payload)
    buf = io.BytesIO()
    arrays = {str(k): np.asarray(t) for k, t in enumerate(tensors)}
    # numpy's stub lets **kwds fill savez's `allow_pickle: bool` as well, so it refuses any **dict of arrays.
    np.savez(buf, **arrays, names=np.array(list(names or []), dtype=str),  # type: ignore[arg-type]
             round=np.array(round_no))
    return buf.getvalue()


# What write_report may write into a directory; any of them left from an earlier run is removed.
OUTPUT_FILES = ("report.json", "curves.png", "model.keras", "scaler.json")


def clear_outputs(out: Path) -> None:
    """Remove a previous run's report files from out (logs and other files stay)."""
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)


def written(out: Path) -> list[str]:
    """The report files in out, in OUTPUT_FILES order (after write_report: exactly what it wrote)."""
    return [name for name in OUTPUT_FILES if (out / name).is_file()]


def run_times(store: RunStore) -> dict[int, float]:
    """Round -> seconds from the run's first start to its commit (curves.png's time axis)."""
    start = _f(store.state().get("started_at"))
    return {k: t - start for k, t in commit_times(store.events()).items()} if start else {}


def curves(store: RunStore, rounds: list[dict[str, Any]], path: Path, x_axis: str = "round") -> Path | None:
    """Write the run's curves.png with x_axis (one of X_AXES); None, and no file, without rounds."""
    if x_axis not in X_AXES:
        raise FedqError(f"curves.png x axis must be one of {', '.join(X_AXES)}, not {x_axis!r}")
    times = run_times(store) if x_axis == "time" else None
    return write_curves(rounds, path, title=f"run {store.run_id}", times=times)


def write_report(store: RunStore, out: Path, with_model: bool = True, x_axis: str = "round") -> dict[str, Any]:
    """Write report.json, curves.png (once a round committed; x_axis one of X_AXES) and, when the run
    finished, model.keras and scaler.json; a previous run's files there are removed first, so the
    directory never mixes runs."""
    report = build_report(store)  # first: an unknown run must not leave an empty directory behind
    out.mkdir(parents=True, exist_ok=True)
    clear_outputs(out)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    curves(store, report["rounds"], out / "curves.png", x_axis)
    if with_model and report["status"] == Status.FINISHED:
        save_model(store, out)
    return report
