"""The one vLLM engine: an ``AsyncLLM`` with multi-LoRA enabled, built from config.

Clients never see ``LoRARequest``: they name an adapter, the store pins it to
a content-addressed version, and this wrapper gives each (name, version) its
own integer id, handed out once from a counter and never reused. vLLM keys its
adapter slots and prefix-cache blocks on that id, so a new version of an
adapter can never be served the KV cache or slot of an old one.

A version reaches a generation request only after it loaded once through
``add_lora`` (:meth:`LoraEngine.ensure_loaded`). vLLM runs ``add_lora``
between two engine steps, so first the worker builds the adapter in a
background thread (``serving.lora_residency``'s prefetch, polled every
:data:`PREFETCH_POLL_S`) and ``add_lora`` then takes the built adapter: the
other requests' tokens wait only for the host-cache insert and the slot copy,
not for reading and converting the files. ``add_lora`` is a utility call:
``EngineCoreProc._invoke_utility_method`` (vllm/v1/engine/core.py) catches the exception and returns it as ``UtilityOutput.failure_message``, and
``_process_utility_output`` (core_client.py) raises it on the caller's future,
so a refused adapter fails this one call and the engine keeps running. A
LoRA load that fails inside the engine-core *step* (the path a request takes
when the adapter is not loaded yet) is instead fatal for the whole engine.
Once a version has loaded, a later reload by the step (after vLLM's LRU
evicted it) reads the same content-addressed, verified files, so it loads
again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from adapter_store import ServedAdapter
from serving.adapter_rules import vllm_lora_rank
from serving.config import Settings
from serving.engine_fork import use_start_method
from serving.lora_residency import (
    PREFETCH_DONE_METHOD,
    PREFETCH_METHOD,
    RESIDENCY_METHOD,
    LoraResidencyExtension,
)
from serving.sizing import EngineSizing, detect_hardware, resolve_sizing

if TYPE_CHECKING:
    from vllm import RequestOutput, SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

_GIB = 1 << 30
RESIDENCY_POLL_S = 0.5
"""How often :meth:`LoraEngine.watch_residency` asks the engine while requests run or adapters change."""
PREFETCH_POLL_S = 0.02
"""How often :meth:`LoraEngine._add_off_step` asks the worker whether its background load finished (one short
RPC between two steps each time; a 4 MB adapter builds in about 5 ms, a 64 MB one in about 50 ms)."""


class AdapterLoadFailed(Exception):
    """The engine refused to load an adapter version (its ``add_lora`` call failed); the engine is fine."""


def engine_args(settings: Settings, sizing: EngineSizing):
    """Translate settings into vLLM ``AsyncEngineArgs``; every knob is explicit (``sizing``: the resolved sizes)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    model, engine = settings.model, settings.engine
    return AsyncEngineArgs(
        model=str(model.path),
        tokenizer=str(model.tokenizer or model.path),
        served_model_name=[model.name],
        dtype=sizing.dtype.value,
        max_model_len=model.max_model_len,
        enable_lora=True,
        max_loras=sizing.max_loras.value,
        max_lora_rank=vllm_lora_rank(engine.max_lora_rank),
        max_cpu_loras=sizing.max_cpu_loras.value,
        max_num_seqs=engine.max_num_seqs,
        max_num_batched_tokens=engine.max_num_batched_tokens,
        kv_cache_memory_bytes=None if engine.kv_cache_gib is None else int(engine.kv_cache_gib * _GIB),
        gpu_memory_utilization=engine.gpu_memory_utilization,
        enable_prefix_caching=engine.enable_prefix_caching,
        enforce_eager=engine.enforce_eager,
        seed=engine.seed,
        disable_log_stats=False,
        # Worker methods of ours: where each LoRA id sits, loads off the step (serving.lora_residency).
        worker_extension_cls=f"{LoraResidencyExtension.__module__}.{LoraResidencyExtension.__qualname__}",
        distributed_executor_backend=executor_backend(),
        **scheduler_args(engine.lora_max_overtakes),
    )


def executor_backend() -> str | None:
    """On the CPU, the worker runs in the engine-core process (serving.cpu_executor); elsewhere vLLM chooses.

    Named, not imported: the class imports vLLM's executor, and only the engine-core process needs it.
    """
    from vllm.platforms import current_platform

    return "serving.cpu_executor.InProcessCpuExecutor" if current_platform.is_cpu() else None


def scheduler_args(max_overtakes: int | None) -> dict:
    """vLLM's scheduler with bounded adapter-fair admission (serving.lora_scheduler); ``None``: vLLM's own.

    The class is named, not imported (it subclasses vLLM's scheduler, and serving imports vLLM only when it
    starts it), on the scheduler of the platform: synchronous on the CPU (vLLM's CPU platform turns async
    scheduling off), async on a GPU, set explicitly so class and mode match. ``max_overtakes`` reaches the
    engine-core process in vLLM's ``additional_config``.
    """
    if max_overtakes is None:
        return {}
    from vllm.platforms import current_platform

    from serving.lora_scheduler import MAX_OVERTAKES_KEY

    gpu = not current_platform.is_cpu()
    return {
        "scheduler_cls": f"serving.lora_scheduler.{'FairLoraAsyncScheduler' if gpu else 'FairLoraScheduler'}",
        "async_scheduling": gpu,
        "additional_config": {MAX_OVERTAKES_KEY: max_overtakes},
    }


@dataclass(frozen=True)
class Residency:
    """The (name, version) of every adapter version the engine holds, by tier, as its worker reported them.

    ``slot``: in one of the ``max_loras`` LoRA slots of the batch; ``host``:
    in the host-memory cache (``max_cpu_loras``). A version in a slot is in
    the host cache too.
    """

    slot: frozenset[tuple[str, str]] = frozenset()
    host: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class FairnessCounts:
    """How often the adapter-fair scheduler acted since the engine started (``serving.lora_scheduler``)."""

    due: int = 0  # blocked requests that reached engine.lora_max_overtakes
    drains: int = 0  # slot holders chosen to drain for a due request
    held: int = 0  # waiting requests held out of a step's scan, summed over steps


class ResidentAdapters:
    """Serving's mirror of vLLM's host-memory adapter cache: an LRU of ``max_cpu_loras`` versions.

    vLLM loads an adapter into its CPU cache on first use and evicts the least
    recently used one when full; it reports neither. Replaying the same policy
    over the requests sent gives per-adapter hits, misses (loads) and
    evictions for the metrics. Under concurrency the engine may order uses a
    little differently, so these are estimates; ``LoraEngine.loaded`` asks the
    engine for the truth.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, str], ServedAdapter] = OrderedDict()

    def use(self, adapter: ServedAdapter) -> tuple[bool, list[ServedAdapter]]:
        """Record a use: whether it was resident, and what the load pushed out."""
        key = (adapter.name, adapter.version)
        if key in self._entries:
            self._entries.move_to_end(key)
            return True, []
        self._entries[key] = adapter
        evicted = []
        while len(self._entries) > self.capacity:
            evicted.append(self._entries.popitem(last=False)[1])
        return False, evicted

    def drop(self, name: str, version: str) -> None:
        self._entries.pop((name, version), None)

    def __iter__(self):
        return iter(list(self._entries.values()))


class LoraEngine:
    """Owns the ``AsyncLLM`` and the adapter → ``LoRARequest`` mapping."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sizing = resolve_sizing(settings, detect_hardware())
        self._llm: AsyncLLM | None = None
        self._lora_ids: dict[tuple[str, str], int] = {}
        self._lora_keys: dict[int, tuple[str, str]] = {}  # the inverse of _lora_ids
        self._next_id = itertools.count(1)
        self._verified: set[tuple[str, str]] = set()  # versions add_lora has loaded once
        self._loading: dict[tuple[str, str], asyncio.Future[None]] = {}  # loads in flight only
        self.resident = ResidentAdapters(self.sizing.max_cpu_loras.value)
        self.residency = Residency()  # kept current by watch_residency
        # Likewise; None: vLLM's own scheduler, nothing to count.
        self.fairness = None if settings.engine.lora_max_overtakes is None else FairnessCounts()
        self._residency_changed = asyncio.Event()

    async def start(self) -> None:
        """Build the engine (loads the base model; takes seconds to minutes)."""
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        logger.info("starting vLLM engine for %s", self.settings.model.path)
        self.sizing.log()
        args = engine_args(self.settings, self.sizing)
        config = args.create_engine_config()  # on the CPU, vLLM's platform hook sets spawn here
        if current_platform.is_cpu():
            use_start_method()  # fork when safe (serving.engine_fork); read when AsyncLLM launches the core
        self._llm = AsyncLLM.from_vllm_config(
            config, enable_log_requests=args.enable_log_requests, disable_log_stats=args.disable_log_stats
        )

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    @property
    def llm(self) -> AsyncLLM:
        if self._llm is None:
            raise RuntimeError("engine not started")
        return self._llm

    @property
    def ready(self) -> bool:
        return self._llm is not None and not self._llm.errored

    def lora_request(self, adapter: ServedAdapter) -> LoRARequest:
        """The ``LoRARequest`` of one adapter version; its id is stable and never reused."""
        from vllm.lora.request import LoRARequest

        key = (adapter.name, adapter.version)
        lora_id = self._lora_ids.get(key)
        if lora_id is None:
            lora_id = self._lora_ids[key] = next(self._next_id)
            self._lora_keys[lora_id] = key
        # The name is the one clients use: vLLM reports it in `vllm:lora_requests_info`,
        # which adapter-aware routers (Gateway API Inference Extension) match on.
        return LoRARequest(
            lora_name=adapter.name,
            lora_int_id=lora_id,
            lora_path=str(adapter.path),
            base_model_name=self.settings.model.name,
        )

    def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        adapter: ServedAdapter | None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream outputs of one request; cancelling the iterator aborts it in the engine."""
        from vllm.inputs import TokensPrompt

        lora = None
        if adapter is not None:
            lora = self.lora_request(adapter)
            self._residency_changed.set()  # scheduling it may load it into a slot and evict another
        return self.llm.generate(TokensPrompt(prompt_token_ids=prompt_token_ids), params, request_id, lora_request=lora)

    async def ensure_loaded(self, adapter: ServedAdapter) -> None:
        """Load a version with ``add_lora`` unless it loaded before; call before sending it any request.

        Concurrent first requests share one load. Raises
        :class:`AdapterLoadFailed` if the engine refuses the adapter (the
        engine keeps serving everyone else); other errors (the engine being
        down) propagate as they are.
        """
        key = (adapter.name, adapter.version)
        if key in self._verified:
            return
        pending = self._loading.get(key)
        if pending is None:
            pending = self._loading[key] = asyncio.ensure_future(self._add(adapter))
            pending.add_done_callback(lambda _: self._loading.pop(key, None))
            pending.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if all waiters left
        await asyncio.shield(pending)  # one caller giving up does not cancel the others' load

    async def _add(self, adapter: ServedAdapter) -> None:
        try:
            await self._add_off_step(self.lora_request(adapter))
        except Exception as e:
            if not self.ready:
                raise
            raise AdapterLoadFailed(f"the engine could not load it: {e}") from e
        finally:
            self._residency_changed.set()
        self._verified.add((adapter.name, adapter.version))

    async def _add_off_step(self, request: LoRARequest) -> None:
        """``add_lora`` with the adapter built beforehand in the worker's background thread.

        A refused adapter fails the ``add_lora`` (the background load's
        exception is raised there), exactly as a load inside it would.
        """
        args = (request.lora_name, request.lora_int_id, request.lora_path)
        await self.llm.collective_rpc(PREFETCH_METHOD, args=args)
        while not all(await self.llm.collective_rpc(PREFETCH_DONE_METHOD, args=(request.lora_int_id,))):
            await asyncio.sleep(PREFETCH_POLL_S)
        await self.llm.add_lora(request)

    async def load(self, adapter: ServedAdapter) -> None:
        """Load an adapter into the engine's host cache ahead of its first request (pinned adapters)."""
        if (adapter.name, adapter.version) in self._verified:  # known to load: bring it back into the host cache
            await self._add_off_step(self.lora_request(adapter))
            self._residency_changed.set()
        else:
            await self.ensure_loaded(adapter)
        self.resident.use(adapter)

    async def unload(self, name: str, version: str) -> bool:
        """Drop a version from the engine's caches; ``False`` if it was not loaded. Requests load it again."""
        self.resident.drop(name, version)
        self._verified.discard((name, version))
        lora_id = self._lora_ids.get((name, version))
        if lora_id is None or lora_id not in await self.llm.list_loras():
            return False
        try:
            return await self.llm.remove_lora(lora_id)
        finally:
            self._residency_changed.set()

    async def loaded(self) -> list[tuple[str, str]]:
        """The (name, version) of every adapter in the engine's host cache, as the engine reports it."""
        ids = await self.llm.list_loras()
        return sorted(key for key, lora_id in self._lora_ids.items() if lora_id in ids)

    async def read_residency(self) -> Residency:
        """Where the engine holds each version now: one round trip to its worker, answered between two steps."""
        (slots, host), *_ = await self.llm.collective_rpc(RESIDENCY_METHOD)
        keys = self._lora_keys  # ids the engine holds that we never handed out (vLLM's warm-up) are left out
        return Residency(
            slot=frozenset(keys[i] for i in slots if i in keys), host=frozenset(keys[i] for i in host if i in keys)
        )

    async def read_fairness(self) -> FairnessCounts | None:
        """The fair scheduler's counts: one utility call, answered by the engine core between two steps.

        ``None`` when the engine runs vLLM's own scheduler (``engine.lora_max_overtakes: null``).
        """
        if self.settings.engine.lora_max_overtakes is None:
            return None
        from serving.lora_scheduler import FAIRNESS_UTILITY

        counts = await self.llm.engine_core.call_utility_async(FAIRNESS_UTILITY)
        return FairnessCounts(**counts)

    async def _read_engine_state(self) -> None:
        self.residency = await self.read_residency()
        self.fairness = await self.read_fairness()

    async def watch_residency(self, interval_s: float = RESIDENCY_POLL_S) -> None:
        """Keep :attr:`residency` and :attr:`fairness` current; a task for the life of the engine (never at scrape).

        The engine moves adapters only when it schedules an adapter's request
        or runs ``add_lora``/``remove_lora``, and each of those signals here.
        Idle, this waits and costs nothing. After a signal it waits
        ``interval_s`` (the request reaches the engine meanwhile), then asks the
        worker every ``interval_s`` until an ask that began with no request
        unfinished and saw no new signal: that ask read the state the last
        request left. So :attr:`residency` trails the engine by at most
        ``interval_s`` plus one round trip; so do the fair scheduler's counts,
        which move only while adapter requests wait.
        """
        while True:
            await self._residency_changed.wait()
            while True:
                await asyncio.sleep(interval_s)
                self._residency_changed.clear()
                busy = self.llm.output_processor.has_unfinished_requests()
                try:
                    await self._read_engine_state()
                except Exception:
                    if not self.ready:  # a dead engine holds nothing; health answers 503 meanwhile
                        logger.warning("engine is down: it holds no adapters now")
                        self.residency = Residency()
                        return
                    logger.exception("could not read the engine's adapter residency; asking again")
                    self._residency_changed.set()
                if not busy and not self._residency_changed.is_set():
                    break

    async def abort(self, request_id: str) -> None:
        await self.llm.abort(request_id)

    async def check_health(self) -> None:
        await self.llm.check_health()
