"""Adapter health probes through the engine, and the start-up warm-up built on them.

A probe leases a version's files, loads them the way requests do
(``ensure_loaded``: a refusal fails the probe, never the engine) and generates
a few greedy tokens; the outcome is recorded as the version's health, which
the selector reads before serving it. Store calls block, so each runs in a
worker thread; the engine is driven on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from typing import Any

from adapter_store import AdapterStore, AdapterStoreError, AdapterVersion, HealthRecord, ServedAdapter
from serving.api.errors import EngineUnavailableError, store_error
from serving.api.protocol import SamplingRequest
from serving.api.sampling import sampling_params
from serving.engine import LoraEngine

logger = logging.getLogger(__name__)

PROBE_PROMPT = "Hello"
PROBE_TOKENS = 4


class ProbeFailed(Exception):
    """The engine served the adapter, but its output is unusable (no tokens, non-finite log-probabilities)."""


class AdapterProbe:
    """Checks adapter versions by generating with them; one per server."""

    def __init__(self, engine: LoraEngine, store: AdapterStore, tokenizer: Any) -> None:
        self.engine = engine
        self.store = store
        self.tokenizer = tokenizer

    async def probe(self, version: AdapterVersion) -> HealthRecord:
        """Load the version and generate a few greedy tokens; record ``ok`` or ``failed`` with the reason.

        Fails on files that cannot be leased (checksum, source), an engine
        error for this adapter, or output without tokens or with non-finite
        log-probabilities (e.g. NaN weights). If the engine itself is down the
        adapter is not blamed: the probe raises 503 and records nothing.
        """
        started = time.perf_counter()
        reason = None
        try:
            adapter = await asyncio.to_thread(self.store.acquire, version)
        except AdapterStoreError as e:
            reason = f"{type(e).__name__}: {e.message}"
        else:
            try:
                await self.engine.ensure_loaded(adapter)  # the requests' path: a refusal fails the probe only
                await self._generate(adapter)
            except Exception as e:
                if not self.engine.ready:
                    raise EngineUnavailableError("The engine is not running; retry the check later.") from e
                reason = f"{type(e).__name__}: {e}"
            finally:
                self.store.release(adapter)
        if reason is not None:
            logger.warning("health check of %s failed: %s", version.ref, reason)
        latency = time.perf_counter() - started
        try:
            return await asyncio.to_thread(
                self.store.record_health,
                version.name,
                version.version,
                "ok" if reason is None else "failed",
                reason=reason,
                latency_s=latency,
            )
        except AdapterStoreError as e:  # deleted meanwhile
            raise store_error(e) from e

    async def _generate(self, adapter: ServedAdapter) -> None:
        request = SamplingRequest(model=adapter.name, temperature=0.0, ignore_eos=True)
        params = sampling_params(request, PROBE_TOKENS, logprobs=0, stream=False)
        ids = self.tokenizer.encode(PROBE_PROMPT)
        final = None
        async for output in self.engine.generate(ids, params, f"health-{uuid.uuid4().hex}", adapter):
            final = output
        completion = final.outputs[0] if final is not None and final.outputs else None
        if completion is None or len(completion.token_ids) != PROBE_TOKENS:
            raise ProbeFailed(
                f"expected {PROBE_TOKENS} tokens, got {0 if completion is None else len(completion.token_ids)}"
            )
        steps = completion.logprobs or []
        values = [step[token].logprob for token, step in zip(completion.token_ids, steps, strict=False) if step]
        if len(values) != PROBE_TOKENS or not all(math.isfinite(v) for v in values):
            raise ProbeFailed(f"non-finite log-probabilities {values}: the adapter's weights are unusable")

    # -- start-up -----------------------------------------------------------------------

    async def startup(self, names: list[str]) -> None:
        """Check the configured adapters and load the pinned ones, so first requests find them warm."""
        versions, pinned = await asyncio.to_thread(
            lambda: ([self.store.version(n) for n in names], self.store.pinned())
        )
        records = await asyncio.gather(*(self.probe(v) for v in versions))
        for version, record in zip(versions, records, strict=True):
            logger.info(
                "adapter %s: health %s (%.0f ms)", version.ref[:40], record.state, 1000 * (record.latency_s or 0)
            )
        for version in pinned:
            await self.preload(version)

    async def preload(self, version: AdapterVersion) -> None:
        """Load a pinned version into the engine now (its files stay on disk: pinned versions are never evicted)."""
        try:
            adapter = await asyncio.to_thread(self.store.acquire, version)
        except AdapterStoreError as e:
            raise store_error(e) from e
        try:
            await self.engine.load(adapter)
        finally:
            self.store.release(adapter)
        logger.info("preloaded pinned adapter %s", version.ref[:40])
