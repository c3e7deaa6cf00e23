"""A fedq client process for secure-aggregation tests: it records what it would send in clear, and can drop.

    python tests/support/secagg_client.py --shard K --run RUN --record DIR [--drop-after-push ROUND]

Like ``fedq client --once``, plus: every round it writes ``DIR/<client>-r<round>.npz`` with its plain
input (the quantised, weighted vector before masking), its trained weights (``w<i>``) and the global
model it trained from (``b<i>``), as float32, so a
test can compute the committed model independently and look for any of them in Redis; with
``--drop-after-push R`` it exits right after pushing its masked input of round R (before revealing);
with ``--hold-push R:FILE`` it waits (up to 10 minutes) until FILE exists before pushing its input
of round R, so that a test decides when that input arrives; with ``--fake-train`` it trains with
``support.fake_client``'s FakeTrainer instead of Keras (no TensorFlow in the process), for runs whose
test is about the protocol, not learning.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

# This file's own folder holds redis.py (the tests' server helper), which would shadow redis-py.
sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fedq.protocol.connection import connect
from fedq.protocol.vocabulary import Push
from fedq.roles.client import Client
from fedq.roles.secure_client import Outgoing, SecureStages
from fedq.settings import Settings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shard", type=int, required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--record", type=Path, required=True)
    ap.add_argument("--drop-after-push", type=int, default=0)
    ap.add_argument("--hold-push", default="", help="ROUND:FILE: push that round's input once FILE exists")
    ap.add_argument("--fake-train", action="store_true", help="FakeTrainer for Keras (support.fake_client)")
    args = ap.parse_args()
    hold_round, _, hold_file = args.hold_push.partition(":")
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(levelname)s %(message)s")

    class Recording(SecureStages):
        def plain_input(self, weights: list[np.ndarray], base: list[np.ndarray], num_examples: int) -> np.ndarray:
            x = super().plain_input(weights, base, num_examples)
            np.savez(args.record / f"{self.client_id}-r{self.round_no}.npz", x=x,
                     **{f"w{i}": np.asarray(w, dtype=np.float32) for i, w in enumerate(weights)},
                     **{f"b{i}": np.asarray(b, dtype=np.float32) for i, b in enumerate(base)})
            return x

        def outgoing(self, names: list[str], weights: list[np.ndarray], base: list[np.ndarray], num_examples: int,
                     metrics: dict[str, float]) -> Outgoing:
            if hold_file and self.round_no == int(hold_round):
                logging.getLogger("secagg-test").info("%s: holding round %d's push until %s exists", self.client_id,
                                                      self.round_no, hold_file)
                deadline = time.monotonic() + 600
                while not Path(hold_file).exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
            return super().outgoing(names, weights, base, num_examples, metrics)

        def after_push(self, outcome: str) -> None:
            if outcome == Push.OK and self.round_no == args.drop_after_push:
                logging.getLogger("secagg-test").info("%s: dropping after pushing round %d", self.client_id,
                                                      self.round_no)
                logging.shutdown()
                os._exit(0)  # gone before revealing anything
            super().after_push(outcome)

    class RecordingClient(Client):
        secure_stages = Recording

    settings = Settings.from_env()
    factory = None
    if args.fake_train:
        sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests/: the support package
        from support.fake_client import trainer as factory
    RecordingClient(connect(settings), settings, args.shard, run_id=args.run,
                    trainer_factory=factory).serve(once=True)


if __name__ == "__main__":
    main()
