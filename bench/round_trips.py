"""Redis round trips of a round, counted: the aggregator's and each client's, per round.

Runs a federation as bench/round_overhead.py does (the real aggregator, N no-op client
processes, a private redis-server) with bench/tripcount on every process's PYTHONPATH, which
logs each send to Redis (one command, one pipeline or one MULTI: one round trip). Prints, for
rounds 2+, the median round trips per round of the aggregator and of one client, and the
aggregator's sends of one round in order, so that each can be traced to the code that made it.

    python bench/round_trips.py --model 1m --clients 10 --rounds 4
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.round_overhead import MODELS, tcp_redis, wait_all  # noqa: E402
from fedq.learning.spec import RunSpec  # noqa: E402
from fedq.protocol import scripts  # noqa: E402
from fedq.protocol.connection import connect  # noqa: E402
from fedq.protocol.store import RunStore  # noqa: E402
from fedq.roles.jobs import submit_run  # noqa: E402
from fedq.roles.localredis import die_with_parent  # noqa: E402
from fedq.settings import Settings  # noqa: E402

SHAS = {hashlib.sha1(text.encode()).hexdigest()[:8]: name for name, text in scripts.SCRIPTS.items()}


def run(n: int, model: str, rounds: int, trips: Path) -> None:
    """One federation with every process's sends logged under trips."""
    with tcp_redis() as url:
        settings = Settings.from_env(env={}, redis_url=url)
        r = connect(settings)
        spec = RunSpec(clients=n, rounds=rounds, local_epochs=1, model=MODELS[model], run_id=f"trips-{n}",
                       central_eval=False).validate()
        submit_run(r, settings, spec, queue="trips")
        env = dict(os.environ, FEDQ_REDIS_URL=url, FEDQ_LOG_LEVEL="WARNING", FEDQ_BLOCK_SECONDS="0.5",
                   PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'bench' / 'tripcount'}", FEDQ_TRIPS_DIR=str(trips))
        agg = subprocess.Popen([sys.executable, "-m", "fedq", "aggregator", "--queue", "trips", "--burst"],
                               env=env, cwd=ROOT, preexec_fn=die_with_parent)
        clients = [subprocess.Popen([sys.executable, str(ROOT / "bench" / "round_overhead.py"), "--client", url,
                                     spec.run_id, str(k)], env=env, cwd=ROOT, preexec_fn=die_with_parent)
                   for k in range(n)]
        wait_all(agg, clients, RunStore(r, spec.run_id), 1800)


def parse(path: Path) -> list[tuple[float, list[str], str]]:
    """(time, commands, the fedq functions that sent them) of each send logged in path."""
    out = []
    for line in path.read_text().splitlines():
        when, *commands, where = line.split()
        out.append((float(when), [_named(c) for c in commands], where))
    return out


def _named(command: str) -> str:
    name, _, sha = command.partition(":")
    return f"{name}:{SHAS.get(sha, sha)}" if sha else name


def by_round(sends: list[tuple[float, list[str], str]], marker: str) -> list[list[tuple[float, list[str], str]]]:
    """Sends split after each one whose commands include marker (the round's last send)."""
    rounds: list[list[tuple[float, list[str], str]]] = [[]]
    for send in sends:
        rounds[-1].append(send)
        if any(marker in c for c in send[1]):
            rounds.append([])
    return rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="1m")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    trips = Path(tempfile.mkdtemp(prefix="fedq-trips-"))
    run(args.clients, args.model, args.rounds, trips)
    logs = {p: parse(p) for p in trips.glob("*.log")}
    agg = [s for s in logs.values() if any("aggregator." in w for _, _, w in s)]
    clients = [s for s in logs.values() if any("client." in w for _, _, w in s)]
    agg_rounds = by_round(max(agg, key=len), "EVALSHA:COMMIT")[2:args.rounds]  # rounds 2+, complete ones
    client_rounds = [r for s in clients for r in by_round(s, "EVALSHA:PUSH")[2:args.rounds]]
    print(f"model {args.model}, N={args.clients}, rounds 2..{args.rounds}: round trips per round")
    print(f"  aggregator: median {statistics.median(len(r) for r in agg_rounds)}")
    print(f"  one client: median {statistics.median(len(r) for r in client_rounds)}")
    kinds = collections.Counter(f"{' '.join(c)}  [{w}]" for r in agg_rounds[:1] for _, c, w in r)
    print("aggregator, one round (count  commands  [sent from]):")
    for kind, count in kinds.most_common():
        print(f"  {count:>4}  {kind}")
    kinds = collections.Counter(f"{' '.join(c)}  [{w}]" for r in client_rounds[:1] for _, c, w in r)
    print("one client, one round:")
    for kind, count in kinds.most_common():
        print(f"  {count:>4}  {kind}")


if __name__ == "__main__":
    main()
