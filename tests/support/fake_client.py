"""``python -m support.fake_client client ...``: the fedq CLI, started as users start it, whose
clients train with ``FakeTrainer`` instead of Keras (no TensorFlow in the process).

For tests about the protocol rather than learning (kills, restarts, deadlines, liveness): the
process is the real ``fedq client`` (options, signals, heartbeat, joining, pushing, exit codes);
only local training is replaced. Each shard's update is the global model plus
0.01 x (shard + 1) x round, so clients' updates differ and a FedAvg of them is checkable, and
training takes ``FEDQ_TEST_TRAIN_SECONDS`` x (shard + 1) seconds (default 0.3), so rounds have
a "mid-round" for a test to act in. ``fake_client_cmd`` and ``fake_client_env`` start it.

``python -m support.fake_client submit ... --no-central-eval`` is fedq's ``submit`` whose run
comes with ``support.initial``'s initial model (numpy) instead of one built in a TensorFlow
child; everything else it does (checks, the run's records, the rq job) is fedq's own.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import numpy as np

from support.procs import ROOT, fedq_cmd
from support.trainer import FakeTrainer

SECONDS_ENV = "FEDQ_TEST_TRAIN_SECONDS"


def fake_client_cmd(*args: str) -> list[str]:
    """argv of `fedq args...` with FakeTrainer as the clients' trainer (PYTHONPATH: fake_client_env)."""
    return [sys.executable, "-m", "support.fake_client", *fedq_cmd(*args)[3:]]


def fake_client_env(env: dict[str, str], seconds: float | None = None) -> dict[str, str]:
    """env with tests/ importable (support.fake_client) and, when given, the seconds a shard trains."""
    path = os.pathsep.join(filter(None, [str(ROOT / "tests"), str(ROOT), env.get("PYTHONPATH")]))
    out = {**env, "PYTHONPATH": path}
    if seconds is not None:
        out[SECONDS_ENV] = str(seconds)
    return out


def _names(run_id: str) -> list[str]:
    """The layer names of the run's global model, read from Redis as the client reads them (in
    parts too)."""
    from fedq.protocol import transfer
    from fedq.protocol.connection import connect
    from fedq.protocol.store import RunStore
    from fedq.settings import Settings

    r = connect(Settings.from_env())
    try:
        return transfer.read_global(RunStore(r, run_id))[1]
    finally:
        r.close()


def trainer(spec: Any, num_features: int, num_classes: int, x: np.ndarray, y: np.ndarray, shard: int,
            stop: threading.Event, **_: Any) -> FakeTrainer:
    """A client's trainer_factory (KerasTrainer's signature, threads= included)."""
    delta = 0.01 * (shard + 1)
    seconds = float(os.environ.get(SECONDS_ENV, "0.3")) * (shard + 1)
    return FakeTrainer(lambda tensors, rnd: [(t + delta * rnd).astype(t.dtype) for t in tensors],
                       names=_names(spec.run_id), num_examples=len(y), seconds=seconds)


def store_with_run(r: Any, settings: Any, spec: Any) -> bool:
    """fedq.roles.initial.store_with_run's stand-in: support.initial's model, made without TensorFlow."""
    if spec.central_eval:
        return False
    from support.initial import store_initial

    store_initial(r, spec.run_id, settings.chunk_bytes)
    return True


def main() -> None:
    import fedq.roles.client
    from fedq.cli import main as fedq_main

    fedq.roles.client.KerasTrainer = trainer  # type: ignore[assignment,misc]  # the default trainer_factory
    if sys.argv[1:2] in (["submit"], ["aggregator"]):  # the commands that submit a run
        import fedq.roles.jobs

        fedq.roles.jobs.store_with_run = store_with_run
    fedq_main(prog_name="fedq")


if __name__ == "__main__":
    main()
