"""``loadtests.rss``: the RSS of a process tree, and a sampler that sees a child's peak after the child has freed it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

from loadtests.rss import RssSampler, tree_rss

# A child that takes 200 MiB (touched, so resident), holds it for 0.3 s (six of the sampler's 0.05 s intervals), frees
# it, then waits to be stopped.
CHILD = (
    "import sys, time; b = bytearray(200 << 20); print('held', flush=True); time.sleep(0.3); del b; "
    "print('freed', flush=True); time.sleep(30)"
)


def test_a_tree_counts_its_live_children_and_not_its_zombies() -> None:
    """A child that exited but is not reaped yet (as a test session's retired servers are) holds no memory."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while psutil.Process(exited.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the second child never exited"
            time.sleep(0.05)
        rss = tree_rss(os.getpid())
        assert child.pid in rss and os.getpid() in rss and exited.pid not in rss
        assert all(value > 0 for value in rss.values())
    finally:
        child.kill()
        child.wait()
        exited.wait()


def test_the_sampler_keeps_the_peak_and_checks_growth_against_the_budget() -> None:
    with RssSampler(os.getpid(), interval_s=0.05) as sampler:
        child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            assert [child.stdout.readline().strip() for _ in range(2)] == ["held", "freed"]
            time.sleep(0.2)
        finally:
            child.kill()
            child.wait()
    assert sampler.peak - sampler.start >= 200 << 20
    assert sampler.last < sampler.peak - (150 << 20)  # freed (and the child gone): only the peak remembers it
    within, over = sampler.report(1 << 30), sampler.report(100 << 20)
    assert within["growth_bytes"] == sampler.peak - sampler.start
    assert (within["growth_within_budget"], over["growth_within_budget"]) == (True, False)
    assert within["rss_baseline_bytes"] is None and within["growth_over_baseline_within_budget"] is None


def test_growth_is_also_measured_from_a_marked_baseline() -> None:
    with RssSampler(os.getpid(), interval_s=0.05) as sampler:
        held = bytearray(100 << 20)  # before the baseline: not counted from it
        sampler.mark_baseline()
        more = bytearray(100 << 20)
    report = sampler.report(1 << 30)
    assert report["growth_bytes"] >= 200 << 20
    assert 90 << 20 <= report["growth_over_baseline_bytes"] < 150 << 20
    assert report["growth_over_baseline_within_budget"] is True
    del held, more


def test_each_process_is_reported_on_its_own() -> None:
    """Which process grew: the child's 200 MiB shows in its own peak, not in the parent's."""
    with RssSampler(os.getpid(), interval_s=0.05) as sampler:
        sampler.mark_baseline()
        child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "held"
            time.sleep(0.3)
        finally:
            child.kill()
            child.wait()
    rows = {row["pid"]: row for row in sampler.report(None)["by_process"]}
    assert rows[child.pid]["peak_bytes"] >= 200 << 20 and "baseline_bytes" not in rows[child.pid]  # came later
    me = rows[os.getpid()]
    assert me["start_bytes"] <= me["baseline_bytes"] + (16 << 20) and me["peak_bytes"] < me["start_bytes"] + (100 << 20)
