"""``FleetEvents``: other replicas' engine events handed from the change feed's thread to the event loop and
done to this replica's engine, with stand-ins for the store, engine and probe (pure logic; the real fleet is
tests/e2e/test_fleet.py, the real feed tests/adapter_store/test_changes.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from adapter_store import AdapterVersion, EngineEvent
from serving.api.adapters import fleet
from serving.api.adapters.fleet import FleetEvents

REPLICA = "f" * 32


def _digest(n: int) -> str:
    return f"{n:02x}" * 32


def _version(name: str, n: int, *, pinned: bool) -> AdapterVersion:
    metadata: Any = None  # never read here
    return AdapterVersion(
        name=name, version=_digest(n), metadata=metadata, source="upload:x", created_at=0, pinned=pinned
    )


VERSIONS = [_version("code", 1, pinned=True), _version("code", 2, pinned=False), _version("legal", 3, pinned=True)]


@dataclass
class Fakes:
    """The store, engine and probe as FleetEvents uses them; what was done is recorded in ``done``."""

    loaded: set[tuple[str, str]] = field(default_factory=set)
    ready: bool = True
    fail_preload: bool = False
    done: list[tuple[str, str, str]] = field(default_factory=list)  # (action, name, digest)
    subscriber: tuple[Callable[[EngineEvent], None], Callable[[], None]] | None = None

    # store
    def versions(self, name: str) -> list[AdapterVersion]:
        return [v for v in VERSIONS if v.name == name]

    def pinned(self) -> list[AdapterVersion]:
        return [v for v in VERSIONS if v.pinned]

    def subscribe(self, on_event: Callable[[EngineEvent], None], on_missed: Callable[[], None]) -> None:
        self.subscriber = (on_event, on_missed)

    # engine
    async def unload(self, name: str, version: str) -> bool:
        self.done.append(("unload", name, version))
        return True

    async def loaded_versions(self) -> list[tuple[str, str]]:
        return sorted(self.loaded)

    # probe
    async def preload(self, version: AdapterVersion) -> None:
        if self.fail_preload:
            raise RuntimeError("engine refused it")
        self.done.append(("preload", version.name, version.version))


class Engine:
    def __init__(self, fakes: Fakes) -> None:
        self.fakes = fakes
        self.unload = fakes.unload
        self.loaded = fakes.loaded_versions

    @property
    def ready(self) -> bool:
        return self.fakes.ready


def _events(fakes: Fakes, loop: asyncio.AbstractEventLoop) -> FleetEvents:
    store: Any = fakes
    return FleetEvents(Engine(fakes), store, store, loop)  # type: ignore[arg-type]


def _event(kind: str, name: str, n: int) -> EngineEvent:
    return EngineEvent(kind, name, _digest(n), REPLICA)  # type: ignore[arg-type]


# what arrives (None: events may have been missed) -> what is done to this replica's engine
CASES = {
    "unload": ([_event("unload", "code", 2)], [("unload", "code", _digest(2))]),
    "unload-of-a-version-never-loaded": ([_event("unload", "code", 9)], [("unload", "code", _digest(9))]),
    "preload-of-a-pinned-version": ([_event("preload", "code", 1)], [("preload", "code", _digest(1))]),
    "preload-unpinned-since": ([_event("preload", "code", 2)], []),
    "preload-of-a-version-deleted-since": ([_event("preload", "code", 9)], []),
    "preload-of-a-name-deleted-since": ([_event("preload", "gone", 1)], []),
    "missed-preloads-pinned-it-lacks": ([None], [("preload", "legal", _digest(3))]),  # code@1 is loaded
    "in-order": (
        [_event("unload", "code", 1), _event("preload", "code", 1)],
        [("unload", "code", _digest(1)), ("preload", "code", _digest(1))],
    ),
}


@pytest.mark.parametrize(("arriving", "done"), CASES.values(), ids=CASES.keys())
def test_events_from_another_thread_are_done_to_the_engine_in_order(arriving: list, done: list) -> None:
    async def scenario() -> list:
        fakes = Fakes(loaded={("code", _digest(1))})
        events = _events(fakes, asyncio.get_running_loop())
        events.subscribe()
        assert fakes.subscriber is not None
        on_event, on_missed = fakes.subscriber

        def feed() -> None:  # the change feed's thread
            for item in arriving:
                on_missed() if item is None else on_event(item)

        task = asyncio.create_task(events.run())
        thread = threading.Thread(target=feed)
        thread.start()
        await asyncio.to_thread(thread.join)
        await _settle(events)
        task.cancel()
        return fakes.done

    assert asyncio.run(scenario()) == done


def test_a_failed_event_does_not_stop_the_next_and_a_stopped_engine_gets_none() -> None:
    async def scenario() -> None:
        fakes = Fakes(fail_preload=True)
        events = _events(fakes, asyncio.get_running_loop())
        task = asyncio.create_task(events.run())
        events.deliver(_event("preload", "code", 1))  # fails: logged
        events.deliver(_event("unload", "code", 2))
        await _settle(events)
        assert fakes.done == [("unload", "code", _digest(2))]
        fakes.ready = False
        events.deliver(_event("unload", "code", 1))
        events.missed()
        await _settle(events)
        assert fakes.done == [("unload", "code", _digest(2))]
        task.cancel()

    asyncio.run(scenario())


def test_a_flood_beyond_the_bound_is_dropped_and_the_pins_reconciled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet, "MAX_PENDING", 3)

    async def scenario() -> list:
        fakes = Fakes()
        events = _events(fakes, asyncio.get_running_loop())
        for _ in range(10):  # nothing applies them yet: all but 3 are dropped
            events.deliver(_event("unload", "legal", 3))
        await asyncio.sleep(0.01)  # the hand-overs run
        assert events._pending.qsize() == 3
        task = asyncio.create_task(events.run())
        await _settle(events)
        task.cancel()
        return fakes.done

    done = asyncio.run(scenario())
    pins = [("preload", "code", _digest(1)), ("preload", "legal", _digest(3))]
    assert done == pins + [("unload", "legal", _digest(3))] * 2  # the first one taken became the reconcile


async def _settle(events: FleetEvents, bound_s: float = 5.0) -> None:
    """Return once every queued event was taken and the last one had time to run; fail past ``bound_s``."""
    await asyncio.sleep(0.01)
    async with asyncio.timeout(bound_s):  # a dead run() task leaves them queued
        while not events._pending.empty():
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
