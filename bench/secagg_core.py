"""Secure aggregation's protocol core at model size (no Redis, no training): CPU and bytes per round.

Per client: quantise + weight (encode), keys and shares (share), masking (mask), opening its
inbox and revealing (reveal). Aggregator: folding the masked vectors (fold) and rebuilding the
seeds and taking the masks out (unmask + decode). Beside them, the plain path's costs: the
float32 update's bytes and the FedAvg fold of N float32 updates. 10% of the clients drop after
sharing, so the dropped clients' masks are rebuilt too. Medians of ``--repeat`` interleaved runs.

    python bench/secagg_core.py [--params 1000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from collections.abc import Callable

import numpy as np

from fedq.learning.aggregate import FedAvg
from fedq.protocol.secagg import wire
from fedq.protocol.secagg.masking import add_into
from fedq.protocol.secagg.params import SecAggParams
from fedq.protocol.secagg.participant import Participant
from fedq.protocol.secagg.quantise import decode_sum, encode_input
from fedq.protocol.secagg.unmasking import RoundRecord, unmask

CONFIGS = [(10, 9, 6), (50, 12, 7)]  # (clients, neighbours, threshold): everyone at 10, SecAgg+ at 50


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def one_round(n: int, k: int, t: int, params_count: int) -> dict[str, float]:
    """CPU seconds of each step (client steps: the median client) and bytes, for one round."""
    params = SecAggParams.from_options(neighbours=k, threshold=t)
    rng = np.random.default_rng(0)
    update = [rng.normal(0, 0.05, params_count).astype(np.float32)]
    ids = [f"c{i:02d}" for i in range(n)]
    ps = {c: Participant("bench", 1, c, params) for c in ids}
    roster = {c: p.advertise() for c, p in ps.items()}
    cost: dict[str, list[float]] = {"encode": [], "share": [], "mask": [], "reveal": []}
    commitments, inboxes, nbytes = {}, {c: {} for c in ids}, {"shares": 0, "reveal": 0}
    for c, p in ps.items():
        s, (commit, bundles) = _timed(lambda p=p: p.share(roster, b"bench-seed-0123456789"))
        cost["share"].append(s)
        commitments[c] = commit
        nbytes["shares"] = max(nbytes["shares"], len(wire.encode_shares(commit, bundles)))
        for peer, sealed in bundles.items():
            inboxes[peer][c] = sealed
    dropped = set(ids[:: 10])  # 10% drop after sharing
    alive = [c for c in ids if c not in dropped]
    total = np.zeros(params_count + 1, np.uint32)
    fold = 0.0
    for c in alive:
        s, x = _timed(lambda: encode_input(update, 100, params, rng))
        cost["encode"].append(s)
        s, y = _timed(lambda c=c, x=x: ps[c].masked(x, commitments))
        cost["mask"].append(s)
        s, _ = _timed(lambda y=y: add_into(total, y))
        fold += s
    reveals = {}
    for c in alive:
        s, rv = _timed(lambda c=c: ps[c].reveal(alive, commitments, inboxes[c]))
        cost["reveal"].append(s)
        nbytes["reveal"] = max(nbytes["reveal"], len(wire.encode_reveal(rv)))
        reveals[c] = rv
    record = RoundRecord("bench", 1, params, roster, b"bench-seed-0123456789", commitments)
    s_unmask, got = _timed(lambda: unmask(record, total, alive, reveals))
    s_decode, _ = _timed(lambda: decode_sum(got.total, len(alive), [(params_count,)], params))
    plain = FedAvg(update)
    s_plain, _ = _timed(lambda: [plain.add(update, 100) for _c in alive])
    out = {f"client_{k}_s": statistics.median(v) for k, v in cost.items()}
    out.update(agg_fold_s=fold, agg_unmask_s=s_unmask + s_decode, plain_fold_s=s_plain,
               masked_bytes=(params_count + 1) * 4, plain_bytes=params_count * 4,
               shares_bytes=nbytes["shares"], reveal_bytes=nbytes["reveal"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}, "
          f"load {os.getloadavg()[0]:.1f}, params {args.params}, repeats {args.repeat} (interleaved)")
    runs: dict[tuple[int, int, int], list[dict[str, float]]] = {c: [] for c in CONFIGS}
    for _ in range(args.repeat):
        for cfg in CONFIGS:
            runs[cfg].append(one_round(*cfg, args.params))
    for (n, k, t), rs in runs.items():
        med = {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        print(f"N={n} neighbours={k} threshold={t}: " + ", ".join(
            f"{key} {v:.3f}" if key.endswith("_s") else f"{key} {int(v)}" for key, v in med.items()))
    print(f"load after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
