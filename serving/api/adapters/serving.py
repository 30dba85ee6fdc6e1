"""Serving class of /v1/adapters: the store's admin operations (list, register, upload, alias, pin, unload,
delete) and the per-adapter health view; health probes and start-up warm-up are in
:mod:`serving.api.adapters.probe`.

Store calls block (fetches, hashing, the registry's SQLite lock), so each
operation does its store work in one worker-thread hop; unloads talk to the
engine on the event loop. Unload, delete and pin then publish an engine event
so every other replica of a fleet does the same to its engine
(:mod:`serving.api.adapters.fleet`).
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from adapter_store import (
    TENANT_TAG,
    AdapterNotFound,
    AdapterStoreError,
    AdapterVersion,
    CatalogEntry,
    HealthRecord,
    InvalidRef,
)
from serving.api.adapter_info import AdapterInfo, adapter_info, entry_info
from serving.api.adapters.probe import AdapterProbe
from serving.api.adapters.protocol import (
    AdapterList,
    AdapterView,
    AliasRequest,
    CacheView,
    DeleteResult,
    HealthView,
    MemoryView,
    RegisterRequest,
    SizeView,
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
from serving.api.selector import AdapterSelector
from serving.engine import LoraEngine

if TYPE_CHECKING:
    from starlette.datastructures import UploadFile

T = TypeVar("T")

UPLOAD_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
"""A plain file name: no directories, no leading dot."""
_CHUNK = 1 << 20
DISK_MEASURE_MAX_AGE_S = 1.0
"""How old a page's measured ``disk_bytes`` may be: measuring walks every cached file (~0.2 s at 10,000
versions, four fifths of a page's cost), and a page is what dashboards poll."""


class AdaptersServing:
    def __init__(
        self, engine: LoraEngine, selector: AdapterSelector, probe: AdapterProbe, limiter: RequestLimiter
    ) -> None:
        self.engine = engine
        self.limiter = limiter
        self.selector = selector
        self.store = selector.store
        self.probe = probe

    @staticmethod
    async def _store(fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Run blocking store work in a worker thread; its typed errors become API errors."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except AdapterStoreError as e:
            raise store_error(e) from e

    # -- reading ------------------------------------------------------------------------

    async def list_adapters(self, *, limit: int, after: str | None) -> AdapterList:
        """A page from the store's full listing (``entries()``: in memory until the registry changes), not a
        few registry reads per adapter: a page of 100 took ~2,300 queries that way."""
        loaded = await self._loaded()

        def read() -> tuple[list[AdapterView], bool, int]:
            entries = self.store.entries()  # code-point order of the names, whatever the database's collation
            start = bisect.bisect_right([e.name for e in entries], after) if after is not None else 0
            page = [self._entry_view(entry, loaded) for entry in entries[start : start + limit]]
            return page, start + limit < len(entries), self.store.bytes_on_disk(max_age_s=DISK_MEASURE_MAX_AGE_S)

        page, has_more, disk = await self._store(read)
        return AdapterList(
            data=page,
            first_id=page[0].name if page else None,
            last_id=page[-1].name if page else None,
            has_more=has_more,
            cache=self._cache_view(loaded, disk),
        )

    def _cache_view(self, loaded: set[tuple[str, str]], disk: int) -> CacheView:
        sizing = self.engine.sizing
        memory = sizing.memory
        return CacheView(
            disk_bytes=disk,
            disk_budget_bytes=self.store.settings.disk_budget_bytes,
            max_loras=sizing.max_loras.value,
            max_cpu_loras=self.engine.resident.capacity,
            loaded=[f"{name}@{version}" for name, version in sorted(loaded)],
            sizing={
                key: SizeView(value=c.value, source=c.source, reason=c.reason) for key, c in sizing.items().items()
            },
            memory=None
            if memory is None
            else MemoryView(
                budget_bytes=memory.budget_bytes,
                adapter_bytes=memory.adapter_bytes,
                slot_buffer_bytes=memory.slot_buffer_bytes,
                slot_copy_bytes=memory.slot_copy_bytes,
                shared_copy_bytes=memory.shared_copy_bytes,
                parts=memory.parts(),
            ),
        )

    def _entry_view(self, entry: CatalogEntry, loaded: set[tuple[str, str]]) -> AdapterView:
        """:meth:`_adapter_view` from a listing's entry: no registry read (``is_cached`` looks at the disk cache)."""
        return AdapterView(
            name=entry.name,
            tenant=entry.owner,
            aliases=dict(entry.aliases),
            versions=[
                self._view_of(v, loaded, entry_info(entry, v))
                for v in entry.versions.values()  # newest first, as AdapterStore.versions lists them
            ],
        )

    async def show(self, name: str) -> AdapterView:
        loaded = await self._loaded()
        return await self._store(self._adapter_view, name, loaded)

    def _adapter_view(self, name: str, loaded: set[tuple[str, str]]) -> AdapterView:
        """Blocking: reads the registry."""
        versions = self.store.versions(name)
        if not versions:
            raise NotFoundError(f"No adapter is registered as {name!r}; GET /v1/adapters lists them.", param="name")
        return AdapterView(
            name=name,
            tenant=self.store.tenant(name),
            aliases=self.store.aliases(name),
            versions=[self._version_view(v, loaded) for v in versions],
        )

    def _version_view(self, version: AdapterVersion, loaded: set[tuple[str, str]]) -> VersionView:
        """Blocking: reads the registry."""
        return self._view_of(version, loaded, adapter_info(self.store, version))

    def _view_of(self, version: AdapterVersion, loaded: set[tuple[str, str]], info: AdapterInfo) -> VersionView:
        return VersionView(
            name=version.name,
            id=version.ref,
            source=version.source,
            pinned=version.pinned,
            cached=self.store.is_cached(version),
            loaded=(version.name, version.version) in loaded,
            info=info,
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
        budget = self.limiter.limits.max_upload_bytes

        def stage_and_register() -> AdapterVersion:  # files and the registry: one worker-thread hop
            left = budget
            with self.store.staging() as staging:
                for upload in files:
                    left -= self._save_upload(upload, staging, left)
                return self.store.register_upload(staging, name, tenant=tenant, aliases=tuple(aliases))

        version = await self._store(stage_and_register)
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
            await self.probe.probe(version)
        loaded = await self._loaded()
        return await self._store(lambda: self._version_view(self.store.version(version.ref), loaded))

    # -- managing -----------------------------------------------------------------------

    async def set_alias(self, name: str, alias: str, request: AliasRequest) -> VersionView:
        version = await self._store(self.store.set_alias, name, alias, f"{name}@{request.version}")
        return await self._store(self._version_view, version, await self._loaded())

    async def pin(self, ref: str, pinned: bool) -> VersionView:
        """Pinned: kept on disk on every replica (the registry's flag) and loaded now, here and on every other
        replica (an engine event, :mod:`serving.api.adapters.fleet`), like pins at start-up. Unpinned: released
        on every replica by that same flag, and unloaded nowhere (see :mod:`serving.api.adapters.fleet`)."""
        version = await self._store(self.store.pin, ref, pinned)
        if pinned:
            await self.probe.preload(version)
            await self._store(self.store.publish_engine_event, "preload", version)
        return await self._store(self._version_view, version, await self._loaded())

    async def unload(self, ref: str) -> UnloadResult:
        """Unload from this engine (``unloaded``: whether it held the version) and from every other replica's
        (best-effort: a replica not listening at that moment keeps it until its LRU drops it)."""
        version = await self._store(self.store.version, ref)
        unloaded = await self.engine.unload(version.name, version.version)
        await self._store(self.store.publish_engine_event, "unload", version)
        return UnloadResult(id=version.ref, unloaded=unloaded)

    async def delete(self, ref: str) -> DeleteResult:
        """Refused while pinned, aliased (other than ``latest``) or serving requests; unloaded fleet-wide."""
        version = await self._store(self.store.delete, ref)
        await self.engine.unload(version.name, version.version)
        await self._store(self.store.publish_engine_event, "unload", version)
        return DeleteResult(id=version.ref)

    # -- health -------------------------------------------------------------------------

    async def health(self, ref: str, principal: Principal) -> HealthView:
        """Unknown refs and other tenants' adapters get the same 404, as for generation requests.

        Callers other than admins see the failure's code (``AdapterLoadFailed``,
        ``engine_load_failed``, ``InvalidAdapter``...), not its detail.
        """

        def read() -> tuple[AdapterVersion, HealthRecord] | None:
            try:
                version = self.store.version(ref)
            except (AdapterNotFound, InvalidRef):
                return None
            if not self.selector.may_use(principal, version.name):
                return None
            return version, self.store.health(version.name, version.version)

        found = await self._store(read)
        if found is None:
            raise NotFoundError(
                f"No adapter {ref!r} is served to this key; GET /v1/models lists the ones it may use.", param="ref"
            )
        version, record = found
        if record.reason is not None and not principal.is_admin:  # the code only: details name paths and sources
            record = dataclasses.replace(record, reason=record.reason.partition(":")[0])
        return self._health_view(version, record)

    async def check(self, ref: str) -> HealthView:
        version = await self._store(self.store.version, ref)
        return self._health_view(version, await self.probe.probe(version))

    @staticmethod
    def _health_view(version: AdapterVersion, record: HealthRecord) -> HealthView:
        return HealthView(name=version.name, version=version.version, **vars(record))
