"""Serving class of /v1/adapters: the store's admin operations, and health probes through the engine.

Store calls block (fetches, hashing, the registry's write lock), so they run
in worker threads; probes and unloads talk to the engine on the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import re
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapter_store import AdapterNotFound, AdapterStoreError, AdapterVersion, HealthRecord, InvalidRef
from adapter_store.store import TENANT_TAG
from serving.api.adapters.protocol import (
    AdapterList,
    AdapterView,
    AliasRequest,
    CacheView,
    DeleteResult,
    HealthView,
    RegisterRequest,
    UnloadResult,
    VersionView,
)
from serving.api.auth import Principal
from serving.api.errors import (
    EngineUnavailableError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    store_error,
)
from serving.api.limits import RequestLimiter
from serving.api.models.serving import adapter_info
from serving.api.resolver import AdapterResolver
from serving.engine import LoraEngine

if TYPE_CHECKING:
    from starlette.datastructures import UploadFile

logger = logging.getLogger(__name__)

PROBE_PROMPT = "Hello"
PROBE_TOKENS = 4
UPLOAD_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
"""A plain file name: no directories, no leading dot."""
_CHUNK = 1 << 20


class ProbeFailed(Exception):
    """The engine served the adapter, but its output is unusable (no tokens, non-finite log-probabilities)."""


class AdaptersServing:
    def __init__(self, engine: LoraEngine, resolver: AdapterResolver, tokenizer: Any, limiter: RequestLimiter) -> None:
        self.engine = engine
        self.limiter = limiter
        self.resolver = resolver
        self.catalog = resolver.catalog
        self.store = resolver.catalog.store
        self.tokenizer = tokenizer

    async def _store(self, fn, *args, **kwargs):
        """Run a blocking store call in a thread; its typed errors become API errors."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except AdapterStoreError as e:
            raise store_error(e) from e

    # -- reading ------------------------------------------------------------------------

    async def list_adapters(self) -> AdapterList:
        loaded = await self._loaded()
        views = await self._store(lambda: [self._adapter_view(name, loaded) for name in self.store.registry.names()])
        disk = await asyncio.to_thread(self.store.cache.bytes_on_disk)
        cache = CacheView(
            disk_bytes=disk,
            disk_budget_bytes=self.store.cache.budget_bytes,
            max_loras=self.engine.settings.engine.max_loras,
            max_cpu_loras=self.engine.resident.capacity,
            loaded=[f"{name}@{version}" for name, version in sorted(loaded)],
        )
        return AdapterList(data=views, cache=cache)

    async def show(self, name: str) -> AdapterView:
        loaded = await self._loaded()
        return await self._store(self._adapter_view, name, loaded)

    def _adapter_view(self, name: str, loaded: set[tuple[str, str]]) -> AdapterView:
        versions = self.store.registry.versions(name)
        if not versions:
            raise NotFoundError(f"No adapter is registered as {name!r}; GET /v1/adapters lists them.", param="name")
        return AdapterView(
            name=name,
            tenant=self.catalog.owner(name),
            aliases=self.store.registry.aliases(name),
            versions=[self._version_view(v, loaded) for v in versions],
        )

    def _version_view(self, version: AdapterVersion, loaded: set[tuple[str, str]]) -> VersionView:
        return VersionView(
            name=version.name,
            id=version.ref,
            source=version.source,
            pinned=version.pinned,
            cached=self.store.cache.contains(version.version),
            loaded=(version.name, version.version) in loaded,
            info=adapter_info(self.catalog, version),
        )

    async def _loaded(self) -> set[tuple[str, str]]:
        if not self.engine.ready:
            raise EngineUnavailableError("The engine is not running; retry later.")
        return set(await self.engine.loaded())

    # -- registering --------------------------------------------------------------------

    async def register(self, request: RegisterRequest) -> VersionView:
        """A new name becomes ``request.tenant``'s; an existing one must already be (409 otherwise)."""
        version = await self._store(
            self.store.register,
            request.source,
            request.name,
            tenant=request.tenant,
            tags=self._tags(request.tags),
            aliases=tuple(request.aliases),
        )
        return await self._registered(version, request.check)

    def admit_upload(self, principal: Principal, client: str) -> None:
        """429 beyond ``limits.upload_rate``; checked before the upload's body is read."""
        self.limiter.admit_upload(principal, client)

    async def upload(
        self, name: str, files: list[UploadFile], *, tenant: str | None, aliases: list[str], check: bool
    ) -> VersionView:
        """Register uploaded files (``adapter_config.json`` and safetensors weights) as a new version."""
        if not files:
            raise InvalidRequestError(
                "No files were uploaded; send adapter_config.json and the weights.", param="files"
            )
        with self.store.staging() as staging:
            budget = self.limiter.limits.max_upload_bytes
            for upload in files:
                budget -= await asyncio.to_thread(self._save_upload, upload, staging, budget)
            version = await self._store(
                self.store.register_upload, staging, name, tenant=tenant, aliases=tuple(aliases)
            )
        return await self._registered(version, check)

    @staticmethod
    def _save_upload(upload: UploadFile, staging: Path, budget: int) -> int:
        """Copy one part into ``staging`` (blocking); its size, or 413 once ``budget`` bytes are exceeded."""
        filename = upload.filename or ""
        if not UPLOAD_NAME_PATTERN.fullmatch(filename):
            raise InvalidRequestError(
                f"Uploaded file name {filename!r} is not a plain file name (letters, digits, '.', '_', '-'; "
                "no directories); name the parts adapter_config.json and adapter_model.safetensors.",
                param="files",
            )
        target = staging / filename
        if target.exists():
            raise InvalidRequestError(f"The file {filename!r} is uploaded twice.", param="files")
        size = 0
        upload.file.seek(0)
        with target.open("wb") as out:
            while chunk := upload.file.read(_CHUNK):
                size += len(chunk)
                if size > budget:
                    raise PayloadTooLargeError(
                        "The uploaded files are larger than limits.max_upload_bytes allows. Send a smaller adapter.",
                        param="files",
                    )
                out.write(chunk)
        return size

    @staticmethod
    def _tags(tags: dict[str, str]) -> dict[str, str]:
        if TENANT_TAG in tags:
            raise InvalidRequestError(
                f"Set the tenant with the tenant field, not the {TENANT_TAG!r} tag.", param="tags"
            )
        return dict(tags)

    async def _registered(self, version: AdapterVersion, check: bool) -> VersionView:
        if check:
            await self.probe(version)
        loaded = await self._loaded()
        return await self._store(self._version_view, self.store.registry.get(version.ref), loaded)

    # -- managing -----------------------------------------------------------------------

    async def set_alias(self, name: str, alias: str, request: AliasRequest) -> VersionView:
        version = await self._store(self.store.set_alias, name, alias, f"{name}@{request.version}")
        return await self._store(self._version_view, version, await self._loaded())

    async def pin(self, ref: str, pinned: bool) -> VersionView:
        version = await self._store(self.store.pin, ref, pinned)
        if pinned:  # pinned: kept on disk and loaded now, like pins at start-up
            await self.preload(version)
        return await self._store(self._version_view, version, await self._loaded())

    async def unload(self, ref: str) -> UnloadResult:
        version = await self._store(self.store.registry.get, ref)
        unloaded = await self.engine.unload(version.name, version.version)
        return UnloadResult(id=version.ref, unloaded=unloaded)

    async def delete(self, ref: str) -> DeleteResult:
        """Refused while pinned, aliased (other than ``latest``) or serving requests."""
        version = await self._store(self.store.delete, ref)
        await self.engine.unload(version.name, version.version)
        return DeleteResult(id=version.ref)

    # -- health -------------------------------------------------------------------------

    async def health(self, ref: str, principal: Principal) -> HealthView:
        """Unknown refs and other tenants' adapters get the same 404, as for generation requests.

        Callers other than admins see the failure's code (``AdapterLoadFailed``,
        ``engine_load_failed``, ``InvalidAdapter``...), not its detail.
        """
        try:
            version = await asyncio.to_thread(self.store.registry.get, ref)
        except (AdapterNotFound, InvalidRef):
            version = None
        if version is None or not self.resolver.may_use(principal, version.name):
            raise NotFoundError(
                f"No adapter {ref!r} is served to this key; GET /v1/models lists the ones it may use.", param="ref"
            )
        record = await self._store(self.catalog.health, version)
        if record.reason is not None and not principal.is_admin:  # the code only: details name paths and sources
            record = dataclasses.replace(record, reason=record.reason.partition(":")[0])
        return self._health_view(version, record)

    async def check(self, ref: str) -> HealthView:
        version = await self._store(self.store.registry.get, ref)
        return self._health_view(version, await self.probe(version))

    @staticmethod
    def _health_view(version: AdapterVersion, record: HealthRecord) -> HealthView:
        return HealthView(name=version.name, version=version.version, **vars(record))

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
            adapter = await asyncio.to_thread(self.catalog.acquire, version)
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
                self.catalog.release(adapter)
        state = "ok" if reason is None else "failed"
        if reason is not None:
            logger.warning("health check of %s failed: %s", version.ref, reason)
        latency = time.perf_counter() - started
        return await self._store(
            self.store.registry.record_health, version.name, version.version, state, reason=reason, latency_s=latency
        )

    async def _generate(self, adapter) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            max_tokens=PROBE_TOKENS,
            temperature=0.0,
            ignore_eos=True,
            logprobs=0,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        ids = self.tokenizer.encode(PROBE_PROMPT)
        final = None
        async for output in self.engine.generate(ids, params, f"health-{uuid.uuid4().hex}", adapter):
            final = output
        completion = final.outputs[0] if final is not None and final.outputs else None
        if completion is None or len(completion.token_ids) != PROBE_TOKENS:
            raise ProbeFailed(
                f"expected {PROBE_TOKENS} tokens, got {0 if completion is None else len(completion.token_ids)}"
            )
        values = [lp[t].logprob for t, lp in zip(completion.token_ids, completion.logprobs or [], strict=False)]
        if len(values) != PROBE_TOKENS or not all(math.isfinite(v) for v in values):
            raise ProbeFailed(f"non-finite log-probabilities {values}: the adapter's weights are unusable")

    # -- start-up -----------------------------------------------------------------------

    async def startup(self, names: list[str]) -> None:
        """Check the configured adapters and load the pinned ones, so first requests find them warm."""
        versions = await self._store(lambda: [self.store.registry.get(n) for n in names])
        records = await asyncio.gather(*(self.probe(v) for v in versions))
        for version, record in zip(versions, records, strict=True):
            logger.info(
                "adapter %s: health %s (%.0f ms)", version.ref[:40], record.state, 1000 * (record.latency_s or 0)
            )
        for version in await self._store(self.store.registry.pinned):
            await self.preload(version)

    async def preload(self, version: AdapterVersion) -> None:
        adapter = await self._store(self.catalog.acquire, version)
        try:
            await self.engine.load(adapter)
        finally:
            self.catalog.release(adapter)
        logger.info("preloaded pinned adapter %s", version.ref[:40])
