"""curves.png: accuracy and loss per round, train and test, drawn with matplotlib (no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

SERIES = (("train", "#1f77b4", "o"), ("test", "#d62728", "s"))


def _points(rounds: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for m in rounds:
        v = m.get(key)
        if v is not None:
            xs.append(int(m["round"]))
            ys.append(float(v))
    return xs, ys


def write_curves(rounds: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Plot accuracy and loss per round into path (a PNG); None, and no file, when there are no rounds."""
    if not rounds:
        return None
    # The Figure API, not pyplot: no GUI backend, no global state, works without a display.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    for ax, metric, label in ((fig.add_subplot(1, 2, 1), "accuracy", "accuracy"),
                              (fig.add_subplot(1, 2, 2), "loss", "loss")):
        for split, color, marker in SERIES:
            xs, ys = _points(rounds, f"{split}_{metric}")
            if xs:
                ax.plot(xs, ys, color=color, marker=marker, markersize=4, label=f"{split} {label}")
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.lines:
            ax.legend(loc="lower right" if metric == "accuracy" else "upper right")
    if title:
        fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
