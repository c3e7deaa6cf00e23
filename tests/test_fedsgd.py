"""FedAvg vs FedSGD (McMahan et al., 2017): several local epochs per round reach a target accuracy
in far fewer rounds than one full-batch gradient step per round. Same clients, model, optimizer
and learning rate; only the local work per round differs. experiments/fedsgd_vs_fedavg.py runs
the same comparison over several seeds."""

from __future__ import annotations

import dataclasses

import pytest

from fedq.learning.spec import RunSpec
from fedq.roles.simulation import Federation, rounds_to

pytestmark = pytest.mark.slow

TARGET = 0.95
LR = 0.05


def test_fedavg_reaches_the_target_in_far_fewer_rounds_than_fedsgd() -> None:
    fedsgd = RunSpec(clients=5, rounds=400, local_epochs=1, batch_size=10**6, optimizer="sgd",
                     learning_rate=LR, seed=0).validate()
    fedavg = dataclasses.replace(fedsgd, local_epochs=5, batch_size=10)
    sgd_rounds = rounds_to(Federation.build(fedsgd).run(target=TARGET), TARGET)
    avg_rounds = rounds_to(Federation.build(fedavg).run(rounds=40, target=TARGET), TARGET)
    print(f"\nrounds to {TARGET:.0%} test accuracy: FedSGD {sgd_rounds}, FedAvg (E=5, B=10) {avg_rounds}")
    assert avg_rounds is not None and sgd_rounds is not None, (avg_rounds, sgd_rounds)
    assert avg_rounds * 10 <= sgd_rounds, f"FedAvg {avg_rounds} rounds vs FedSGD {sgd_rounds}: expected >= 10x fewer"
