"""Flower's side of bench/peer.py: the same no-op workload on Flower's legacy gRPC API.

Runs in its own virtual environment (flwr is a benchmark-only dependency, never fedq's), started
by bench/peer.py as a subprocess; it imports nothing from fedq.

    python bench/flower_peer.py server PORT CLIENTS ROUNDS SHAPES_JSON OUT_JSON
    python bench/flower_peer.py client PORT SHAPES_JSON

The server is ``flwr.server.start_server`` with FedAvg over every client each round and no
evaluation; each client (``flwr.client.start_client``, transport grpc-bidi) returns the model it
received, unchanged, as fedq's no-op clients do. A round's time is the interval between the ends
of two successive aggregations (fedq's ``seconds``: from one commit to the next).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np


def _zeros(shapes: list[list[int]]) -> list[np.ndarray]:
    return [np.zeros(s, dtype=np.float32) for s in shapes]


def server(port: int, clients: int, rounds: int, shapes: list[list[int]], out: str) -> None:
    import flwr as fl
    from flwr.common import ndarrays_to_parameters

    ends: list[float] = []

    class Timed(fl.server.strategy.FedAvg):  # type: ignore[misc]
        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            got = super().aggregate_fit(server_round, results, failures)
            ends.append(time.time())
            return got

    strategy = Timed(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=clients, min_evaluate_clients=0,
                     min_available_clients=clients, initial_parameters=ndarrays_to_parameters(_zeros(shapes)))
    fl.server.start_server(server_address=f"127.0.0.1:{port}", strategy=strategy,
                           config=fl.server.ServerConfig(num_rounds=rounds))
    with open(out, "w") as f:
        json.dump({"round_ends": ends}, f)


def client(port: int, shapes: list[list[int]]) -> None:
    import flwr as fl

    class NoOp(fl.client.NumPyClient):  # type: ignore[misc]
        def get_parameters(self, config: Any) -> list[np.ndarray]:
            return _zeros(shapes)

        def fit(self, parameters: list[np.ndarray], config: Any) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            return parameters, 100, {}

        def evaluate(self, parameters: list[np.ndarray], config: Any) -> tuple[float, int, dict[str, Any]]:
            return 0.0, 1, {}

    for _ in range(600):  # the server may still be starting: retry the connection
        try:
            fl.client.start_client(server_address=f"127.0.0.1:{port}", client=NoOp().to_client(), insecure=True,
                                   transport="grpc-bidi")
            return
        except Exception:  # connection refused while the server starts
            time.sleep(0.1)


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "server":
        server(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5]), sys.argv[6])
    else:
        client(int(sys.argv[2]), json.loads(sys.argv[3]))
