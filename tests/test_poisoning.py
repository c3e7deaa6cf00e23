"""Poisoning: 1 of 5 clients sends its update scaled by -10. FedAvg collapses; FedMedian, trimmed
mean and Krum stay within 3 points of clean FedAvg. Real Keras training of the seed network on the
built-in data, in one process (fedq.roles.simulation: the same data split, scaler, trainer and strategies
as a run, without Redis; test_strategies_rounds.py covers the strategies on the round protocol)."""

from __future__ import annotations

import dataclasses

import pytest

from fedq.learning.spec import RunSpec
from fedq.learning.strategies import StrategySpec
from fedq.roles.simulation import Federation, gaussian_noise, scaled_update

pytestmark = pytest.mark.slow

ATTACKER = 4  # the fifth client


@pytest.fixture(scope="module")
def federation() -> Federation:
    spec = RunSpec(clients=5, rounds=4, local_epochs=2, seed=0).validate()
    return Federation.build(spec)


@pytest.fixture(scope="module")
def clean(federation: Federation) -> float:
    """The unattacked FedAvg run's final accuracy, the baseline of every test here (run once)."""
    return _final(federation, "fedavg")


def _final(fed: Federation, name: str, attack=None) -> float:
    spec = dataclasses.replace(fed.spec, strategy=StrategySpec(name=name))
    records = fed.run(spec, attackers={ATTACKER: attack} if attack else None)
    return records[-1]["test_accuracy"]


def test_scaled_update_attack_breaks_fedavg_but_not_the_robust_strategies(federation: Federation, clean: float) -> None:
    poisoned = _final(federation, "fedavg", scaled_update(-10.0))
    robust = {name: _final(federation, name, scaled_update(-10.0)) for name in ("fedmedian", "trimmed-mean", "krum")}
    print(f"\nclean FedAvg {clean:.3f}; poisoned FedAvg {poisoned:.3f}; "
          + "; ".join(f"{k} {v:.3f}" for k, v in robust.items()))
    assert clean > 0.93
    assert poisoned < clean - 0.3, "FedAvg should collapse under a -10x update"
    for name, acc in robust.items():
        assert acc >= clean - 0.03, f"{name} fell to {acc:.3f} (clean FedAvg {clean:.3f})"


def test_noise_attack_is_absorbed_by_the_median(federation: Federation, clean: float) -> None:
    noisy = gaussian_noise(3.0)
    assert _final(federation, "fedavg", noisy) < clean - 0.1
    assert _final(federation, "fedmedian", noisy) >= clean - 0.03
