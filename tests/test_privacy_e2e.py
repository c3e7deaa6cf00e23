"""Differential privacy on the real round protocol (real Redis, real TensorFlow):

- central DP: a round commits exactly global + (clipped sum + the keyed noise) / D, and publishes
  epsilon but no per-client norms;
- a real federation (an in-process aggregator and two real Keras clients, 2 rounds) with central
  and with local DP finishes and reports epsilon per round in its metrics and report.json; with
  local DP, what each client pushed is its clipped training result plus noise of std z C (checked
  against what it actually trained);
- the options through ``fedq submit``, and one-line errors from ``fedq run`` and ``aggregator``.

``fedq run --dp central`` itself (three TensorFlow processes: 25-50 s on two shared cores) is the
README's measured run rather than a test, to keep these quick.
"""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import redis
from support.checks import assert_std as _assert_std
from support.checks import flat as _flat
from support.cli import assert_error_line, fedq
from support.cli import pipe_env as _env
from support.wait import wait_until

from fedq.learning import privacy
from fedq.learning.spec import RunSpec, load_spec
from fedq.learning.trainer import KerasTrainer
from fedq.ops.view import print_report
from fedq.protocol import codec
from fedq.protocol.connection import connect
from fedq.protocol.store import RunStore
from fedq.roles.aggregator import Aggregator
from fedq.roles.client import Client
from fedq.roles.report import write_report
from fedq.settings import Settings

pytestmark = pytest.mark.slow
KEY = "test-noise-key"


@pytest.fixture()
def keyed_run(federation_factory: Any) -> Any:
    """Runs on the one federation harness whose aggregators share a DP noise key."""
    return lambda spec: federation_factory(spec, dp_noise_key=KEY)


def test_central_round_is_the_clipped_sum_plus_keyed_noise_over_d(keyed_run) -> None:
    clip, z = 0.5, 1.0
    spec = RunSpec(clients=2, rounds=1, round_timeout=60, run_id="t-dp-central", seed=4,
                   dp="central", dp_clip=clip, dp_noise=z)
    run = keyed_run(spec)
    _, _, g = run.global_model()
    far = [t + 3.0 for t in g]  # an update far beyond C
    assert run.push_tensors("c0", 1, [t.copy() for t in g], 10) == "ok"  # zero update
    assert run.push_tensors("c1", 1, far, 200) == "ok"  # its larger sample count buys nothing
    run.wait_round(1)
    _, _, new = run.global_model()

    rng = privacy.noise_rng(KEY, spec.run_id, spec.seed, 1)
    noise = privacy.gaussian_noise([t.shape for t in g], z * clip, rng)
    clipped, _ = privacy.clip([f.astype(np.float64) - t for f, t in zip(far, g)], clip)
    for got, t, c, n in zip(new, g, clipped, noise):
        np.testing.assert_allclose(got, (t + (c + n) / 2).astype(t.dtype), rtol=1e-6, atol=1e-6)

    m = run.store.metrics()[0]
    assert m["dp_epsilon"] == pytest.approx(privacy.epsilon(z, 1, spec.dp_delta))
    assert m["dp_noise_std"] == pytest.approx(z * clip / 2) and m["dp_delta"] == spec.dp_delta
    assert "update_norms" not in json.dumps(m)  # un-noised facts about clients are not published
    assert json.loads(run.store.state()["final"])["dp_epsilon"] == m["dp_epsilon"]


class RecordingTrainer(KerasTrainer):
    """The real Keras trainer; remembers each round's global model and trained weights. Clients
    in threads of one process take turns to train (Keras' random seed is process-wide)."""

    lock = threading.Lock()
    seen: ClassVar[dict[tuple[str, int], tuple[list[np.ndarray], list[np.ndarray]]]] = {}

    def load(self, tensors: list[np.ndarray]) -> None:
        self._global = [np.array(t) for t in tensors]
        super().load(tensors)

    def train(self, round_no: int) -> dict[str, float]:
        with self.lock:
            out = super().train(round_no)
        self.seen[(f"client-{self.shard}", round_no)] = (self._global, [np.array(w) for w in super().weights()])
        return out


@pytest.mark.parametrize("mode", ["central", "local"])
def test_a_real_federation_with_dp_finishes_and_reports_epsilon(mode: str, r: redis.Redis, redis_url: str,
                                                                tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    clip, z, rounds = 0.5, 1.0, 2
    settings = Settings.from_env(env={}, redis_url=redis_url, block_seconds=0.2)
    spec = RunSpec(clients=2, rounds=rounds, local_epochs=1, round_timeout=120, run_id=f"t-dp-{mode}-fed",
                   model="byo_models:build_mlp", keep_updates=True, dp=mode, dp_clip=clip, dp_noise=z).validate()
    store = RunStore(r, spec.run_id)
    store.create(spec)
    agg = Aggregator(connect(settings), settings, spec.run_id)
    errors: list[BaseException] = []

    def guard(fn: Any) -> None:
        try:
            fn()
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    RecordingTrainer.seen.clear()
    clients = [Client(connect(settings), settings, k, run_id=spec.run_id, trainer_factory=RecordingTrainer)
               for k in range(2)]
    threads = [threading.Thread(target=guard, args=(fn,), daemon=True)
               for fn in [agg.run, *(functools.partial(c.serve, once=True) for c in clients)]]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: store.state().get("status") in ("finished", "failed") or bool(errors), "the run",
                   timeout=180)
        assert not errors, errors
        assert store.state()["status"] == "finished", store.state().get("reason")
    finally:
        agg.stop.set()
        for c in clients:
            c.stop.set()
        for t in threads:
            t.join(timeout=30)

    for round_no in range(1, rounds + 1):
        for cid in ("client-0", "client-1"):
            g, trained = RecordingTrainer.seen[(cid, round_no)]
            pushed = codec.decode(store.read_update(round_no, cid, "", 1 << 30).payload).tensors
            if mode == "central":  # the trusted aggregator gets the trained model as it is
                np.testing.assert_array_equal(_flat(pushed), _flat(trained))
                continue
            # Local: what left the client is its clipped update plus noise of std z C, never the model.
            update, norm = privacy.clip([t.astype(np.float64) - x for t, x in zip(trained, g)], clip)
            assert norm > 0
            _assert_std(_flat(pushed) - _flat(g) - _flat(update), z * clip)

    report = write_report(store, tmp_path / "out", with_model=False)
    eps = [m["dp_epsilon"] for m in report["rounds"]]
    z_eff = z if mode == "central" else z / 2  # local: two clipped updates differ by up to 2 C
    assert eps == pytest.approx([privacy.epsilon(z_eff, k, spec.dp_delta) for k in range(1, rounds + 1)])
    assert eps[0] < eps[1]
    assert report["privacy"] == {**report["privacy"], "mode": mode, "epsilon": eps[-1], "delta": 1e-5,
                                 "clip": clip, "noise_multiplier": z, "rounds": rounds}
    assert all(("dp_noise_std" in m) == (mode == "central") for m in report["rounds"])
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["rounds"][-1]["dp_epsilon"] == eps[-1] and saved["privacy"]["epsilon"] == eps[-1]
    capsys.readouterr()
    print_report(report)
    shown = capsys.readouterr().out
    assert "dp ε" in shown and f"differential privacy ({mode}): ε {eps[-1]:.3g} at δ 1e-05" in shown


def test_dp_options_reach_the_spec_through_submit(redis_url: str, r: redis.Redis) -> None:
    proc = fedq("submit", "--clients", "3", "--dp", "local", "--dp-clip", "2", "--dp-noise", "1.5",
                "--dp-delta", "1e-7", "--strategy", "krum", "--byzantine", "0", "--run-id", "dp-sub",
                env=_env(redis_url))
    assert proc.returncode == 0, proc.stderr
    spec = load_spec(RunStore(r, "dp-sub"))
    assert (spec.dp, spec.dp_clip, spec.dp_noise, spec.dp_delta) == ("local", 2.0, 1.5, 1e-7)


@pytest.mark.parametrize("args, needles", [
    (["run", "--dp", "central", "--dp-noise", "1"], ["--dp central needs --dp-clip"]),
    (["run", "--dp-noise", "1"], ["--dp-noise needs --dp central or --dp local"]),
    (["run", "--dp", "central", "--dp-clip", "1", "--dp-noise", "1", "--strategy", "fedmedian"],
     ["--dp central needs a mean-based strategy", "--dp local"]),
    (["run", "--dp", "local", "--dp-clip", "1", "--dp-noise", "1", "--dp-delta", "0.5"], ["below 1/clients"]),
    (["aggregator", "--clients", "2", "--rounds", "1", "--dp", "central", "--dp-clip", "1", "--dp-noise", "1",
      "--clip-norm", "3"], ["use --dp-clip alone"]),
])
def test_bad_dp_options_are_one_line(redis_url: str, tmp_path: Path, args: list[str], needles: list[str]) -> None:
    extra = ["--out", str(tmp_path / "out")] if args[0] == "run" else []
    proc = fedq(*args, *extra, env=_env(redis_url))
    assert_error_line(proc, *needles)
