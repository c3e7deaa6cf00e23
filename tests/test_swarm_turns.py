"""fedq simulate's turns: the threads of a simulation process that may run at once, in order."""

from __future__ import annotations

import threading
import time

import pytest

from fedq.roles.swarm import Turns


def _queued(turns: Turns, n: int) -> None:
    """Wait until n threads are waiting for a turn."""
    deadline = time.monotonic() + 10
    while len(turns._queue) < n:
        assert time.monotonic() < deadline, f"{len(turns._queue)} of {n} threads queued"
        time.sleep(0.001)


def test_no_more_threads_run_at_once_than_there_are_turns() -> None:
    turns, lock = Turns(3), threading.Lock()
    inside, most = [0], [0]

    def work() -> None:
        for _ in range(5):
            with turns.held():
                with lock:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                time.sleep(0.002)
                with lock:
                    inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert most[0] == 3 and inside[0] == 0


def test_turns_go_to_the_threads_in_the_order_they_asked() -> None:
    turns, order = Turns(1), []
    holding, release = threading.Event(), threading.Event()

    def first() -> None:
        with turns.held():
            holding.set()
            release.wait(10)

    def later(k: int) -> None:
        with turns.held():
            order.append(k)

    holder = threading.Thread(target=first)
    holder.start()
    assert holding.wait(10)
    waiters = []
    for k in range(8):
        waiters.append(threading.Thread(target=later, args=(k,)))
        waiters[-1].start()
        _queued(turns, k + 1)  # each asks only once the one before it waits
    release.set()
    for t in [holder, *waiters]:
        t.join(10)
    assert order == list(range(8))


def test_a_thread_waiting_away_from_its_turn_lets_another_run_and_then_takes_it_back() -> None:
    turns, steps = Turns(1), []
    woken = threading.Event()

    def waiter() -> None:
        with turns.held():
            steps.append("waiter runs")
            with turns.away():  # e.g. blocked on the run's events
                woken.wait(10)
            steps.append("waiter runs again")

    def other() -> None:
        with turns.held():
            steps.append("other runs")
            woken.set()
            time.sleep(0.05)  # the waiter, woken, must wait for this turn to end
            steps.append("other done")

    a = threading.Thread(target=waiter)
    a.start()
    while not steps:
        time.sleep(0.001)
    b = threading.Thread(target=other)
    b.start()
    a.join(10)
    b.join(10)
    assert steps == ["waiter runs", "other runs", "other done", "waiter runs again"]


def test_turns_must_be_at_least_one() -> None:
    with pytest.raises(ValueError, match="turns must be 1 or more"):
        Turns(0)
