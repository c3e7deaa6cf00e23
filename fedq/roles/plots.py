"""curves.png: accuracy and loss per round, train and test, drawn with matplotlib (no display).

The best round (highest test accuracy, else lowest test loss) is marked on both panels; with
times (round -> seconds since the start) the x axis is wall-clock minutes; a note is drawn when
the run looks overfitted (test loss rising for OVERFIT_ROUNDS rounds while train loss falls)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

SERIES = (("train", "#1f77b4", "o"), ("test", "#d62728", "s"))
X_AXES = ("round", "time")  # curves.png's x axis: rounds, or minutes since the run's first start
OVERFIT_ROUNDS = 3  # rounds in a row of rising test loss and falling train loss that earn the note


def _points(rounds: Sequence[dict[str, Any]], key: str, xs_of: Mapping[int, float] | None = None
            ) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for m in rounds:
        v = m.get(key)
        rnd = int(m["round"])
        if v is not None and (xs_of is None or rnd in xs_of):
            xs.append(xs_of[rnd] if xs_of is not None else rnd)
            ys.append(float(v))
    return xs, ys


def best_round(rounds: Sequence[dict[str, Any]]) -> int | None:
    """The round with the highest test accuracy (the lowest test loss when there is none)."""
    acc = [(m["test_accuracy"], m["round"]) for m in rounds if m.get("test_accuracy") is not None]
    if acc:
        return int(max(acc, key=lambda x: (x[0], -x[1]))[1])
    loss = [(m["test_loss"], m["round"]) for m in rounds if m.get("test_loss") is not None]
    return int(min(loss)[1]) if loss else None


def overfitting(rounds: Sequence[dict[str, Any]], k: int = OVERFIT_ROUNDS) -> str | None:
    """A note when, over the last k rounds, test loss rose each round while train loss fell."""
    seen = [m for m in rounds if m.get("test_loss") is not None and m.get("train_loss") is not None]
    if len(seen) < k + 1:
        return None
    tail = seen[-(k + 1):]
    test_up = all(b["test_loss"] > a["test_loss"] for a, b in pairwise(tail))
    train_down = all(b["train_loss"] < a["train_loss"] for a, b in pairwise(tail))
    if not (test_up and train_down):
        return None
    return (f"possible overfitting: test loss rose for {k} rounds ({tail[0]['test_loss']:.4f} to "
            f"{tail[-1]['test_loss']:.4f}) while train loss fell; best round {best_round(rounds)}")


def commit_times(events: list[tuple[float, dict[str, str]]]) -> dict[int, float]:
    """Round -> when it was committed (the time of the store's own 'round' event)."""
    out: dict[int, float] = {}
    for t, f in events:
        if f.get("event") == "round" and f.get("round", "").isdigit():
            out[int(f["round"])] = t
    return out


def write_curves(rounds: Sequence[dict[str, Any]], path: Path, title: str = "",
                 times: Mapping[int, float] | None = None) -> Path | None:
    """Plot accuracy and loss per round into path (a PNG); None, and no file, when there are no rounds.

    times: round -> seconds since the run started; when given, the x axis is minutes (rounds
    without a time are left out). The PNG's Description names the x axis."""
    fig = draw_curves(rounds, title, times)
    if fig is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Title": title or "fedq curves",
                                              "Description": f"x axis: {fig.axes[0].get_xlabel()}"})
    return path


def draw_curves(rounds: Sequence[dict[str, Any]], title: str = "",
                times: Mapping[int, float] | None = None) -> Any:
    """The figure write_curves saves (a matplotlib Figure), or None when there are no rounds."""
    if not rounds:
        return None
    # The Figure API, not pyplot: no GUI backend, no global state, works without a display.
    from matplotlib.figure import Figure

    xs_of = {int(r): float(t) / 60 for r, t in times.items()} if times else None
    best = best_round(rounds)
    note = overfitting(rounds)
    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    for ax, metric in ((fig.add_subplot(1, 2, 1), "accuracy"), (fig.add_subplot(1, 2, 2), "loss")):
        _panel(ax, rounds, metric, xs_of, best)
    if title or note:
        fig.suptitle(title + ("\n" if title and note else "") + (note or ""),
                     color="#b45309" if note else "black")
    return fig


def _panel(ax: Any, rounds: Sequence[dict[str, Any]], metric: str, xs_of: Mapping[int, float] | None,
           best: int | None) -> None:
    """One panel: train and test of metric, the best round marked."""
    from matplotlib.ticker import MaxNLocator

    for split, color, marker in SERIES:
        xs, ys = _points(rounds, f"{split}_{metric}", xs_of)
        if xs:
            ax.plot(xs, ys, color=color, marker=marker, markersize=4, label=f"{split} {metric}")
    if best is not None and (xs_of is None or best in xs_of):
        bx = xs_of[best] if xs_of is not None else best
        ax.axvline(bx, color="#555555", linestyle="--", linewidth=1, label=f"best round ({best})")
        (m,) = [m for m in rounds if int(m["round"]) == best][:1] or [{}]
        if m.get(f"test_{metric}") is not None:
            ax.plot([bx], [m[f"test_{metric}"]], marker="*", markersize=14, color="#111111", linestyle="none")
    ax.set_xlabel("minutes since start" if xs_of is not None else "round")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    locator = ax.xaxis.get_major_locator()
    if xs_of is None and isinstance(locator, MaxNLocator):  # the default AutoLocator is one
        locator.set_params(integer=True)
    if ax.lines:
        ax.legend(loc="lower right" if metric == "accuracy" else "upper right")
