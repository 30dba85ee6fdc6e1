"""Resident memory of a server and every process it started (the engine core, its workers), sampled while it runs.

Why a sampler: the memory a benchmark must hold to a budget is what the
processes take at their peak under load, not a figure read once at the end;
RSS is what the kernel has given them (what a container's memory limit
counts), so it includes the KV cache pages touched, allocator slack and the
Python heap as well as the adapters: growth over the start is an upper bound
on what the adapters took.
"""

from __future__ import annotations

import threading

import psutil


def tree_rss(pid: int) -> dict[int, int]:
    """RSS in bytes of ``pid`` and each of its live descendants, by pid: processes that have exited (meanwhile,
    or earlier and not yet reaped by their parent: zombies, which hold no memory) are left out."""
    root = psutil.Process(pid)
    rss = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            rss[process.pid] = process.memory_info().rss
        except psutil.Error:
            continue
    return rss


class RssSampler:
    """``tree_rss(pid)`` summed every ``interval_s`` on a thread; ``start``, ``peak`` and ``last`` in bytes."""

    def __init__(self, pid: int, interval_s: float = 0.5):
        self.pid, self.interval_s = pid, interval_s
        self.by_pid: dict[int, dict[str, int]] = {}  # per process: start, baseline (if marked), peak, last
        self.start = self.peak = self.last = self._read()
        self.baseline: int | None = None  # set by mark_baseline: RSS once the load alone has warmed the processes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _read(self) -> int:
        """The tree's RSS now, summed; each process's own figures kept in ``by_pid`` (which one grew, and when)."""
        rss = tree_rss(self.pid)
        for pid, value in rss.items():
            seen = self.by_pid.setdefault(pid, {"start": value, "peak": value})
            seen["peak"], seen["last"] = max(seen["peak"], value), value
        return sum(rss.values())

    def _sample(self) -> None:
        self.last = self._read()
        self.peak = max(self.peak, self.last)

    def mark_baseline(self) -> None:
        """Now is the point growth is measured from (e.g. after base traffic, before any adapter is loaded)."""
        self._sample()
        self.baseline = self.last
        for seen in self.by_pid.values():
            seen["baseline"] = seen["last"]

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def report(self, budget_bytes: int | None) -> dict:
        """The figures, and the growth over the start against ``budget_bytes`` (the adapters' host-memory budget)."""
        growth = self.peak - self.start
        after = None if self.baseline is None else self.peak - self.baseline
        return {
            "budget_bytes": budget_bytes,
            "rss_start_bytes": self.start,
            "rss_baseline_bytes": self.baseline,
            "growth_over_baseline_bytes": after,
            "growth_over_baseline_within_budget": None
            if budget_bytes is None or after is None
            else after <= budget_bytes,
            "rss_peak_bytes": self.peak,
            "rss_end_bytes": self.last,
            "growth_bytes": growth,
            "growth_within_budget": None if budget_bytes is None else growth <= budget_bytes,
            "sampled_every_s": self.interval_s,
            "root_pid": self.pid,
            "by_process": [
                {"pid": pid, **{f"{k}_bytes": v for k, v in seen.items()}} for pid, seen in self.by_pid.items()
            ],
        }
