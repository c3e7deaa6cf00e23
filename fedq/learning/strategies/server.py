"""Server optimisers: how the round's combined model moves the global model (pure numpy).

Each treats ``delta = combined - global`` as a pseudo-gradient (Reddi et al., 2021,
"Adaptive Federated Optimization"; Hsu et al., 2019 for server momentum):

- ``replace``: the combined model is the new global (FedAvg, FedProx, the robust ones).
- ``momentum`` (FedAvgM): ``v = beta * v + delta``; ``x = x + lr * v``.
- ``adam`` / ``yogi`` / ``adagrad``: ``m = b1 * m + (1 - b1) * delta``, then
  adam ``v = b2 * v + (1 - b2) * delta^2``, yogi ``v = v - (1 - b2) * delta^2 * sign(v - delta^2)``,
  adagrad ``v = v + delta^2``; ``x = x + lr * m / (sqrt(v) + tau)``, with ``v`` starting at ``tau^2``.

The state (``v``, ``m``) is kept in the tensors' own float dtype (at least float32), exactly
as it is serialised, so a run resumed from Redis continues bit for bit like one that never
stopped. Integer tensors (counters, seeds) are never optimised: they take the combined value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

KINDS = ("replace", "momentum", "adam", "yogi", "adagrad")


def _floating(t: np.ndarray) -> bool:
    return np.issubdtype(t.dtype, np.floating)


def _state_dtype(t: np.ndarray) -> np.dtype:
    return np.result_type(t.dtype, np.float32)


class ServerStep:
    """``replace``: the combined model becomes the global model; no state."""

    kind = "replace"
    slots: tuple[str, ...] = ()

    def __init__(self, template: Sequence[np.ndarray], **_: Any) -> None:
        self._template = [np.asarray(t) for t in template]
        self.steps = 0
        self._slots: dict[str, list[np.ndarray]] = {}

    def step(self, current: Sequence[np.ndarray], combined: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The next global model from the current one and the round's combined model."""
        self.steps += 1
        return [np.asarray(c).astype(np.asarray(x).dtype, copy=False) for x, c in zip(current, combined)]

    # --- state ----------------------------------------------------------------------------
    def state(self) -> tuple[list[str], list[np.ndarray], dict[str, Any]]:
        """(names, tensors, meta) of the optimiser state, for fedq.protocol.codec."""
        names, tensors = [], []
        for slot in self.slots:
            for i, t in enumerate(self._slots.get(slot, [])):
                names.append(f"{slot}/{i}")
                tensors.append(t)
        return names, tensors, {"server": self.kind, "steps": self.steps}

    def load(self, names: Sequence[str], tensors: Sequence[np.ndarray], meta: dict[str, Any]) -> None:
        """Restore what state() returned; ValueError when it does not fit this optimiser and model."""
        if meta.get("server") != self.kind:
            raise ValueError(f"state is of server optimiser {meta.get('server')!r}, this run uses {self.kind!r}")
        steps = meta.get("steps")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"state has an invalid step count {steps!r}")
        slots: dict[str, list[np.ndarray]] = {s: [] for s in self.slots}
        for name, t in zip(names, tensors):
            slot, _, idx = name.partition("/")
            if slot not in slots or idx != str(len(slots[slot])):
                raise ValueError(f"unexpected state tensor {name!r}")
            slots[slot].append(np.array(t))  # a writable copy: the decoded view is read-only
        for slot, got in slots.items():
            if got and len(got) != len(self._template):
                raise ValueError(f"state slot {slot!r} has {len(got)} tensors, the model has {len(self._template)}")
            for t, ref in zip(got, self._template):
                if t.shape != ref.shape or t.dtype != _state_dtype(ref):
                    raise ValueError(f"state slot {slot!r} does not match the model's shapes and dtypes")
        self._slots = {s: v for s, v in slots.items() if v}
        self.steps = steps

    def _slot(self, name: str, fill: float) -> list[np.ndarray]:
        if name not in self._slots:
            self._slots[name] = [np.full(t.shape, fill, dtype=_state_dtype(t)) for t in self._template]
        return self._slots[name]


class Momentum(ServerStep):
    """FedAvgM: server momentum on the pseudo-gradient."""

    kind = "momentum"
    slots = ("v",)

    def __init__(self, template: Sequence[np.ndarray], *, lr: float, momentum: float, **_: Any) -> None:
        super().__init__(template)
        self.lr = float(lr)
        self.momentum = float(momentum)

    def step(self, current: Sequence[np.ndarray], combined: Sequence[np.ndarray]) -> list[np.ndarray]:
        self.steps += 1
        vel = self._slot("v", 0.0)

        def update(i: int, x: np.ndarray, delta: np.ndarray) -> np.ndarray:
            vel[i] = (self.momentum * vel[i] + delta).astype(vel[i].dtype)
            return x + self.lr * vel[i].astype(np.float64)

        return _per_tensor(current, combined, update)


class Adaptive(ServerStep):
    """FedAdam, FedYogi, FedAdagrad (Reddi et al., 2021, Algorithm 2, without bias correction)."""

    slots = ("m", "v")

    def __init__(self, template: Sequence[np.ndarray], *, kind: str, lr: float, beta1: float, beta2: float,
                 tau: float, **_: Any) -> None:
        super().__init__(template)
        if kind not in ("adam", "yogi", "adagrad"):
            raise ValueError(f"unknown adaptive optimiser {kind!r}")
        self.kind = kind
        self.lr, self.beta1, self.beta2, self.tau = float(lr), float(beta1), float(beta2), float(tau)

    def step(self, current: Sequence[np.ndarray], combined: Sequence[np.ndarray]) -> list[np.ndarray]:
        self.steps += 1
        first = self._slot("m", 0.0)
        second = self._slot("v", self.tau ** 2)
        b1, b2 = self.beta1, self.beta2

        def update(i: int, x: np.ndarray, delta: np.ndarray) -> np.ndarray:
            sq = np.square(delta)
            m = b1 * first[i].astype(np.float64) + (1.0 - b1) * delta
            v = second[i].astype(np.float64)
            if self.kind == "adam":
                v = b2 * v + (1.0 - b2) * sq
            elif self.kind == "yogi":
                v = v - (1.0 - b2) * sq * np.sign(v - sq)
            else:
                v = v + sq
            first[i] = m.astype(first[i].dtype)
            second[i] = v.astype(second[i].dtype)
            return x + self.lr * first[i].astype(np.float64) / (np.sqrt(second[i].astype(np.float64)) + self.tau)

        return _per_tensor(current, combined, update)


def _per_tensor(current: Sequence[np.ndarray], combined: Sequence[np.ndarray],
                update: Callable[[int, np.ndarray, np.ndarray], np.ndarray]) -> list[np.ndarray]:
    """Apply update(i, x, combined - x) to each floating tensor (in float64); others are replaced."""
    out = []
    for i, (x, c) in enumerate(zip(current, combined)):
        x = np.asarray(x)
        if not _floating(x):
            out.append(np.asarray(c).astype(x.dtype))
            continue
        out.append(np.asarray(update(i, x, np.asarray(c, dtype=np.float64) - x)).astype(x.dtype))
    return out


def make_server_step(kind: str, template: Sequence[np.ndarray], **params: Any) -> ServerStep:
    """The server optimiser named kind, for a model shaped like template."""
    if kind == "replace":
        return ServerStep(template)
    if kind == "momentum":
        return Momentum(template, **params)
    if kind in ("adam", "yogi", "adagrad"):
        return Adaptive(template, kind=kind, **params)
    raise ValueError(f"unknown server optimiser {kind!r}; known: {', '.join(KINDS)}")
