"""The malloc tunables fedq starts its processes with (fedq.roles.runner.with_malloc_tunables):
a round's multi-MB payloads reuse the pages of the last round's instead of fresh ones the kernel
must zero, and a user's own setting of a tunable wins."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from fedq.roles.runner import MALLOC_TUNABLES, with_malloc_tunables

# Three 4 MB buffers made and freed 5 times, as a 1M-parameter round makes and frees its payloads
# (the bytes read, the payload encoded, a copy); prints the MiB of freed memory the process kept.
ROUNDS = """
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) // 1024
def round_():
    a = bytes(4 << 20); b = bytes(a) + b"x"; c = bytearray(b)
    del a, b, c
base = rss()
for _ in range(5):
    round_()
print(rss() - base)
"""


def _kept_mib(tunables: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    return int(subprocess.run([sys.executable, "-c", ROUNDS], env=env, capture_output=True, text=True,
                              check=True, timeout=60).stdout)


def test_each_tunable_is_added_and_a_users_own_value_is_kept() -> None:
    assert with_malloc_tunables({})["GLIBC_TUNABLES"] == ":".join(f"{n}={v}" for n, v in MALLOC_TUNABLES)
    mine = with_malloc_tunables({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"})["GLIBC_TUNABLES"]
    assert mine.split(":") == ["glibc.malloc.trim_threshold=1", "glibc.malloc.hugetlb=1",
                               f"glibc.malloc.mmap_threshold={32 << 20}"]
    assert with_malloc_tunables({"GLIBC_TUNABLES": mine})["GLIBC_TUNABLES"] == mine


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not os.path.exists("/proc/self/status"),
                    reason="GLIBC_TUNABLES are glibc's; RssAnon is Linux's")
def test_a_rounds_freed_buffers_stay_with_the_process_for_the_next_round() -> None:
    """Kept, the next round's buffers reuse their pages; given back, each round's are fresh pages
    the kernel zeroes (2 % of the machine's CPU in the aggregator of a 10-client 1M round)."""
    kept = _kept_mib(with_malloc_tunables({})["GLIBC_TUNABLES"])
    assert kept >= 12, f"{kept} MiB kept of a round's 12 MiB of buffers"
    huge_pages_only = _kept_mib("glibc.malloc.hugetlb=1")  # fedq's setting before: freed buffers went back
    assert huge_pages_only <= 4 and _kept_mib(None) <= 4, (huge_pages_only, _kept_mib(None))
