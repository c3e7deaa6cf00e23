"""The seed's transport, re-created minimally for comparison: a Flask server that receives
each client's weights as JSON in form fields, scales and sums them once all N arrived, and
answers every client with the average as JSON (as in the Kubeflow example). Waiting uses a
condition variable rather than the example's sleep loops, which only favours the seed.

    python bench/seed_flask.py PORT N
"""

from __future__ import annotations

import json
import sys
import threading

import numpy as np
from flask import Flask, jsonify, request
from waitress import serve


def make_app(n: int) -> Flask:
    app = Flask(__name__)
    cond = threading.Condition()
    state: dict = {"counts": [], "weights": [], "result": None, "served": 0}

    @app.route("/data", methods=["POST"])
    def data():  # type: ignore[no-untyped-def]
        count = int(request.form["local_count"])
        weights = [np.array(w) for w in json.loads(request.form["local_weight"])]
        with cond:
            state["counts"].append(count)
            state["weights"].append(weights)
            if len(state["counts"]) == n:
                total = sum(state["counts"])
                summed = [sum(c / total * w[i] for c, w in zip(state["counts"], state["weights"]))
                          for i in range(len(weights))]
                state["result"] = json.dumps([s.tolist() for s in summed])
                cond.notify_all()
            cond.wait_for(lambda: state["result"] is not None, timeout=600)
            result = state["result"]
            state["served"] += 1
            if state["served"] == n:  # next round starts clean
                state.update(counts=[], weights=[], result=None, served=0)
        return jsonify({"result": result})

    return app


if __name__ == "__main__":
    port, n = int(sys.argv[1]), int(sys.argv[2])
    serve(make_app(n), host="127.0.0.1", port=port, threads=max(8, n + 2), _quiet=True)
