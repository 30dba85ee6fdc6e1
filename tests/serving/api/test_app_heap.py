"""The start-up heap is frozen out of the garbage collector's scans (``serving.api.app.freeze_startup_heap``)."""

from __future__ import annotations

import gc
import weakref

from serving.api.app import freeze_startup_heap


class _Node:
    def __init__(self) -> None:
        self.peer: _Node | None = None


def test_what_start_up_leaves_alive_is_not_scanned_and_its_garbage_is_collected_first() -> None:
    kept = [_Node() for _ in range(10_000)]  # alive for the life of the process, like the loaded modules
    cycle = _Node()
    cycle.peer = _Node()
    cycle.peer.peer = cycle  # start-up garbage only the collector can free
    gone = weakref.ref(cycle)
    del cycle
    run_froze = gc.get_freeze_count() > 0  # the run's own freeze (tests/conftest.py), restored after
    try:
        frozen = freeze_startup_heap()
        assert gone() is None  # collected before the freeze: a frozen cycle would never be
        # (a frozen object that dies leaves the count, so it may have shrunk since: not compared exactly)
        assert frozen >= len(kept) and gc.get_freeze_count() >= len(kept)
        scanned = {id(o) for o in gc.get_objects()}  # what a full collection walks
        assert not any(id(node) in scanned for node in kept)
    finally:
        gc.unfreeze()
        if run_froze:
            gc.freeze()
