"""The other replicas' unloads and pins, done to this replica's engine.

An admin's unload, delete or pin acts on the replica that answered, which then
publishes an engine event (``AdapterStore.publish_engine_event``). The store's
change feed hears the other replicas' events on its own thread;
:class:`FleetEvents` hands each one to the event loop
(``loop.call_soon_threadsafe``) and a task applies them in order: ``unload``
drops that version from this engine, as the local unload does; ``preload``
loads the version if the registry still has it pinned, as the local pin does.

An unpin sends no event, by design: no replica's engine holds a pin of its
own (a pinned version is preloaded, then the engine's LRU may evict it like
any other), so the only thing a pin holds on every replica, the version's
files against disk-cache eviction, is the registry's flag, which every
replica's disk cache reads when it evicts (the last listing's flags during a
registry outage). An unpin through any replica therefore releases the
version everywhere as it commits, and unloads it nowhere; a ``preload`` still
queued here finds the version unpinned and does nothing.

Events travel on PostgreSQL's NOTIFY, which is not durable: an event sent
while this replica was not listening is lost. Whenever that may have happened
(the feed connected again) the feed says so, and this replica preloads every
pinned version its engine lacks; the registry holds the pin flag, so that much
is derivable. A lost unload is not (nothing records it): unload is best-effort
across the fleet, and the engine's LRU drops an unused version in time.
"""

from __future__ import annotations

import asyncio
import logging

from adapter_store import AdapterStore, EngineEvent
from serving.api.adapters.probe import AdapterProbe
from serving.engine import LoraEngine

logger = logging.getLogger(__name__)

MAX_PENDING = 1024
"""Events waiting for the engine beyond this many are dropped (and the pins reconciled): the channel is untrusted."""


class FleetEvents:
    """Applies other replicas' engine events to this replica's engine; :meth:`run` is its task."""

    def __init__(
        self, engine: LoraEngine, store: AdapterStore, probe: AdapterProbe, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.engine = engine
        self.store = store
        self.probe = probe
        self._loop = loop
        self._pending: asyncio.Queue[EngineEvent | None] = asyncio.Queue(MAX_PENDING)  # None: reconcile the pins
        self._overflowed = False

    def subscribe(self) -> None:
        """Start hearing the other replicas' events (before reading the pins at start-up: none falls between)."""
        self.store.subscribe(self.deliver, self.missed)

    def deliver(self, event: EngineEvent) -> None:
        """Any thread: queue ``event`` on the event loop."""
        self._loop.call_soon_threadsafe(self._put, event)

    def missed(self) -> None:
        """Any thread: events may have been lost; reconcile the pins on the event loop."""
        self._loop.call_soon_threadsafe(self._put, None)

    def _put(self, item: EngineEvent | None) -> None:
        try:
            self._pending.put_nowait(item)
        except asyncio.QueueFull:
            if not self._overflowed:
                logger.warning("over %d engine events waiting: dropping them, then reconciling pins", MAX_PENDING)
            self._overflowed = True

    async def run(self) -> None:
        """Apply events one at a time, for the life of the server; a failure is logged and the next one runs."""
        while True:
            item = await self._pending.get()
            if self._overflowed:
                self._overflowed = False
                item = None  # whatever was dropped: the pins are derivable, lost unloads are not
            try:
                await self.apply(item)
            except Exception as e:  # the engine or the registry down, a version deleted meanwhile...
                logger.warning("could not apply the fleet's engine event %s: %s", item, e, exc_info=True)

    async def apply(self, item: EngineEvent | None) -> None:
        """Do one event (``None``: preload every pinned version the engine lacks)."""
        if not self.engine.ready:
            logger.warning("engine not running: engine event %s not applied", item)
            return
        if item is None:
            await self.reconcile()
        elif item.kind == "unload":
            unloaded = await self.engine.unload(item.name, item.version)
            logger.info("%s@%s unloaded by another replica: %s", item.name, item.version[:16], unloaded)
        else:
            versions = await asyncio.to_thread(self.store.versions, item.name)
            for version in versions:
                if version.version == item.version and version.pinned:  # unpinned since: nothing to do
                    await self.probe.preload(version)

    async def reconcile(self) -> None:
        """Preload every pinned version the engine does not hold: what missed ``preload`` events asked."""
        pinned = await asyncio.to_thread(self.store.pinned)
        loaded = set(await self.engine.loaded())
        for version in pinned:
            if (version.name, version.version) not in loaded:
                await self.probe.preload(version)
