"""``LoraEngine.watch_residency``, the poller behind ``loraserve_adapter_loaded``'s slot and host tiers (and the
fair scheduler's counters): it asks the engine only after something could have moved an adapter, follows a running
request, stops asking once the engine is idle, and maps the worker's LoRA ids back to (name, version).

The engine is a stand-in with what the poller uses of vLLM's ``AsyncLLM``
(``collective_rpc``, ``output_processor.has_unfinished_requests``,
``add_lora``/``list_loras``/``remove_lora``, ``errored``, and the engine core's
utility call that reaches the scheduler), and its
``collective_rpc`` runs our real worker extension
(``serving.lora_residency``) against a stand-in of the worker's LoRA manager
with vLLM's attributes (``lora_index_to_id``, ``list_adapters``). The real
engine answers in tests/e2e/test_adapter_loaded_metric.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from adapter_store import ServedAdapter
from serving.config import load_settings
from serving.engine import FairnessCounts, LoraEngine, Residency
from serving.lora_residency import PREFETCH_DONE_METHOD, RESIDENCY_METHOD, LoraResidencyExtension
from serving.lora_scheduler import FAIRNESS_UTILITY
from tests.serving.test_store import write_config

TICK = 0.02  # the poller's interval here


class _LoraManager:
    """vLLM's LRUCacheWorkerLoRAManager as the extension reads it: slots and the host cache."""

    def __init__(self, slots: int) -> None:
        self._adapter_manager = SimpleNamespace(lora_index_to_id=[None] * slots)
        self.host: list[int] = []

    def list_adapters(self) -> set[int]:
        return set(self.host)


class _Worker(LoraResidencyExtension):
    def __init__(self, slots: int) -> None:
        self.model_runner = SimpleNamespace(lora_manager=_LoraManager(slots))


class _Engine:
    """The AsyncLLM stand-in: requests are started and finished by the test; asks are counted."""

    def __init__(self) -> None:
        self.worker = _Worker(slots=1)
        self.unfinished = 0
        self.asks = 0
        self.errored = False
        self.output_processor = SimpleNamespace(has_unfinished_requests=lambda: self.unfinished > 0)
        self.fairness = {"due": 0, "drains": 0, "held": 0}  # what the scheduler would answer
        self.engine_core = SimpleNamespace(call_utility_async=self._utility)

    async def _utility(self, method: str) -> dict[str, int]:
        assert method == FAIRNESS_UTILITY
        return dict(self.fairness)

    @property
    def lora(self) -> _LoraManager:
        return self.worker.model_runner.lora_manager

    async def collective_rpc(self, method: str, args: tuple = ()) -> list:
        if self.errored:
            raise RuntimeError("EngineCore encountered an issue")
        if method != RESIDENCY_METHOD:  # a load's background-build RPCs (tests/serving/test_engine.py): done at once
            return [method == PREFETCH_DONE_METHOD]
        self.asks += 1
        return [getattr(self.worker, method)()]

    def generate(self, prompt, params, request_id, lora_request=None):
        return lora_request

    def schedule(self, lora_id: int) -> None:
        """The engine runs a request of ``lora_id``: into the host cache and the one slot."""
        if lora_id not in self.lora.host:
            self.lora.host.append(lora_id)
        self.lora._adapter_manager.lora_index_to_id[0] = lora_id

    async def add_lora(self, request) -> bool:
        self.lora.host.append(request.lora_int_id)
        return True

    async def list_loras(self) -> set[int]:
        return set(self.lora.host)

    async def remove_lora(self, lora_id: int) -> bool:
        self.lora.host.remove(lora_id)
        slots = self.lora._adapter_manager.lora_index_to_id
        slots[:] = [None if i == lora_id else i for i in slots]
        return True


def _adapter(name: str) -> ServedAdapter:
    return ServedAdapter(name=name, version=name * 8, path=Path("/nonexistent") / name)


@pytest.fixture
def engine(tmp_path: Path) -> tuple[LoraEngine, _Engine]:
    engine = LoraEngine(load_settings(write_config(tmp_path, None, [])))
    fake = _Engine()
    engine._llm = fake  # type: ignore[assignment]
    return engine, fake


def _watching(engine: LoraEngine, scenario) -> None:
    async def run() -> None:
        watcher = asyncio.create_task(engine.watch_residency(TICK))
        try:
            await scenario()
        finally:
            watcher.cancel()

    asyncio.run(run())


def test_the_worker_extension_reports_slots_and_host_cache() -> None:
    worker = _Worker(slots=2)
    worker.model_runner.lora_manager.host = [3, 1, 2]
    worker.model_runner.lora_manager._adapter_manager.lora_index_to_id = [2, None]
    assert getattr(worker, RESIDENCY_METHOD)() == ([2], [1, 2, 3])


def test_an_idle_engine_is_never_asked(engine) -> None:
    lora_engine, fake = engine
    _watching(lora_engine, lambda: asyncio.sleep(10 * TICK))
    assert fake.asks == 0


def test_a_request_is_followed_while_it_runs_and_asking_stops_after(engine) -> None:
    lora_engine, fake = engine
    code, legal = _adapter("code"), _adapter("legal")
    key = (code.name, code.version)

    async def scenario() -> None:
        lora_engine.generate([1], None, "r1", code)  # type: ignore[arg-type]
        fake.unfinished = 1
        await asyncio.sleep(3 * TICK)
        fake.schedule(lora_engine.lora_request(code).lora_int_id)
        await asyncio.sleep(3 * TICK)
        assert lora_engine.residency == Residency(slot=frozenset({key}), host=frozenset({key}))  # while it runs
        lora_engine.generate([1], None, "r2", legal)  # type: ignore[arg-type]
        fake.schedule(lora_engine.lora_request(legal).lora_int_id)  # legal takes the one slot
        fake.fairness.update(due=1, drains=1, held=3)  # the fair scheduler drained code's slot for it
        fake.unfinished = 0
        await asyncio.sleep(3 * TICK)
        asked = fake.asks
        await asyncio.sleep(10 * TICK)
        assert fake.asks == asked  # idle again: no more asks
        other = (legal.name, legal.version)
        assert lora_engine.residency == Residency(slot=frozenset({other}), host=frozenset({key, other}))
        assert lora_engine.fairness == FairnessCounts(due=1, drains=1, held=3)

    assert lora_engine.fairness == FairnessCounts()  # zeros from the start: a counter's first scrape is 0
    _watching(lora_engine, scenario)
    assert fake.asks >= 3


def test_unload_and_explicit_loads_are_seen_within_one_tick(engine) -> None:
    lora_engine, fake = engine
    code = _adapter("code")
    key = (code.name, code.version)

    async def scenario() -> None:
        await lora_engine.load(code)
        await asyncio.sleep(3 * TICK)
        assert lora_engine.residency == Residency(host=frozenset({key}))
        assert await lora_engine.unload(code.name, code.version)
        await asyncio.sleep(3 * TICK)
        assert lora_engine.residency == Residency()

    _watching(lora_engine, scenario)


def test_ids_the_engine_holds_but_we_never_handed_out_are_left_out(engine) -> None:
    lora_engine, fake = engine
    code = _adapter("code")
    fake.lora.host.append(10_000)  # e.g. vLLM's warm-up adapters

    async def scenario() -> None:
        await lora_engine.load(code)
        await asyncio.sleep(3 * TICK)

    _watching(lora_engine, scenario)
    assert lora_engine.residency == Residency(host=frozenset({(code.name, code.version)}))


def test_a_dead_engine_holds_nothing_and_the_watch_ends(engine) -> None:
    lora_engine, fake = engine

    async def scenario() -> None:
        await lora_engine.load(_adapter("code"))
        await asyncio.sleep(3 * TICK)
        assert lora_engine.residency.host
        fake.errored = True
        watcher = asyncio.create_task(lora_engine.watch_residency(TICK))
        lora_engine._residency_changed.set()
        await asyncio.wait_for(watcher, 10 * TICK)  # it returns rather than asking a dead engine for ever

    _watching(lora_engine, scenario)
    assert lora_engine.residency == Residency()
