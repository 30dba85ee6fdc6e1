"""``AdapterStore``: the one object serving talks to.

It ties the registry (what exists), the sources (where files come from), the
validator (what may be served) and the disk cache (local files under a budget)
together::

    store = AdapterStore.open(settings, base=spec, max_lora_rank=16)
    store.register("s3://bucket/adapters/code/", "code", aliases=("stable",))
    with store.lease("code@stable") as adapter:   # ResolvedAdapter(name, version, path, metadata)
        ...  # hand adapter.path to the engine; the files stay on disk until the block ends

Everything here is synchronous and may block on I/O (a fetch, the registry's
write lock): async callers run it in a worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from adapter_store.cache import DiskCache
from adapter_store.digest import content_digest
from adapter_store.errors import AdapterInUse, AdapterNotFound, CacheFull, InvalidRef, LegacyDigest
from adapter_store.migration import DigestMigration
from adapter_store.models import AdapterVersion, Claim, HealthRecord, HealthState, ResolvedAdapter
from adapter_store.refs import LATEST, AdapterRef, check_name
from adapter_store.registry import AdapterRegistry
from adapter_store.settings import StoreSettings
from adapter_store.sources import SourceSet, UploadSource
from adapter_store.validation import AdapterValidator, BaseModelSpec

logger = logging.getLogger(__name__)

TENANT_TAG = "tenant"
"""Reserved tag name: the owner is the name's ``tenant`` (see the registry), never a tag."""

NAME_LOCK_STRIPES = 64
"""On-demand registrations of one name are serialised on one of this many locks (a fixed table, however
many unknown names requests send); two names sharing a stripe merely wait for each other."""


class AdapterStore:
    """Registered, validated, cached adapter versions."""

    def __init__(self, settings: StoreSettings, registry: AdapterRegistry, validator: AdapterValidator) -> None:
        self.settings = settings
        self.registry = registry
        self.validator = validator
        self.uploads = UploadSource(settings.root / "uploads")
        self.sources = SourceSet(settings.sources, extra=[self.uploads])
        # Before the cache scans its directory: it drops entries whose name is not their digest.
        DigestMigration(
            registry, validator, settings.root, self.sources, self.uploads, max_bytes=settings.max_adapter_bytes
        ).run()
        self.cache = DiskCache(
            settings.root / "cache",
            settings.root / "staging",
            settings.disk_budget_bytes,
            fetch=self._fetch,
            check=self.validator.validate,
            pinned=self._pinned_digests,
            lease_wait_s=settings.lease_wait_s,
        )
        self._name_locks = tuple(threading.Lock() for _ in range(NAME_LOCK_STRIPES))

    @classmethod
    def open(
        cls,
        settings: StoreSettings,
        *,
        base: BaseModelSpec,
        max_lora_rank: int,
        loader_check: Callable[[dict], None] | None = None,
        configured_owners: Mapping[str, str | None] | None = None,
    ) -> AdapterStore:
        """Open (or create) the store under ``settings.root``, upgrading a registry of an older schema.

        ``loader_check`` is the engine's own test of an ``adapter_config.json``
        (serving builds it from vLLM), run by the validator on every adapter.
        ``configured_owners``: see :class:`AdapterRegistry`.
        """
        registry = AdapterRegistry(
            settings.root, busy_timeout_s=settings.busy_timeout_s, configured_owners=configured_owners
        )
        validator = AdapterValidator(
            base,
            max_lora_rank=max_lora_rank,
            max_adapter_bytes=settings.max_adapter_bytes,
            loader_check=loader_check,
        )
        return cls(settings, registry, validator)

    def close(self) -> None:
        self.registry.close()

    def _fetch(self, uri: str, dest: Path) -> None:
        self.sources.fetch(uri, dest, max_bytes=self.settings.max_adapter_bytes)

    def _pinned_digests(self) -> set[str]:
        return {v.version for v in self.registry.pinned()}

    # -- registering --------------------------------------------------------------------

    def register(
        self,
        source_uri: str,
        name: str,
        *,
        tenant: str | None = None,
        tags: dict[str, str] | None = None,
        aliases: tuple[str, ...] = (),
    ) -> AdapterVersion:
        """Fetch, validate and register a version; nothing is registered if any step fails.

        The files are fetched into a private staging directory, validated and
        hashed there, then moved into the disk cache, so the version served is
        exactly the bytes that were checked. ``tenant`` must be the name's
        owner if it exists (:class:`OwnershipConflict` otherwise, checked
        before anything is fetched); a new name becomes the tenant's.
        """
        check_name(name)
        self.registry.check_owner(name, tenant)
        with self.staging() as staging:
            self._fetch(source_uri, staging)
            return self.register_staged(staging, name, source=source_uri, tenant=tenant, tags=tags, aliases=aliases)

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A private empty directory for files on their way in (a fetch, an upload); removed afterwards."""
        staging = self.cache.new_staging()
        try:
            yield staging
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def register_staged(
        self,
        staging: Path,
        name: str,
        *,
        source: str,
        tenant: str | None = None,
        tags: dict[str, str] | None = None,
        aliases: tuple[str, ...] = (),
    ) -> AdapterVersion:
        """Validate and register the files in ``staging`` (from :meth:`staging`), then move them into the cache.

        Uploads come in this way; ``source`` records where they came from, but
        such a version cannot be fetched again once evicted, so it is pinned
        on disk by the caller if it must survive eviction.
        """
        check_name(name)
        if TENANT_TAG in (tags or {}):
            raise InvalidRef(f"the tag {TENANT_TAG!r} is reserved: pass the owner as tenant", param="tags")
        metadata = self.validator.validate(staging)  # an invalid adapter never reaches the registry
        version, created = self.registry.register(
            name, content_digest(staging), metadata, source=source, tags=tags, aliases=aliases, tenant=tenant
        )
        try:
            self.cache.adopt(staging, version.version, f"{name}@{version.version[:16]}")
        except CacheFull as e:  # registered all the same: fetched again when there is room
            logger.warning("registered %s but could not cache it: %s", version.ref, e.message)
        logger.info("%s %s from %s", "registered" if created else "already had", version.ref, source)
        return version

    def register_upload(
        self,
        staging: Path,
        name: str,
        *,
        tenant: str | None = None,
        tags: dict[str, str] | None = None,
        aliases: tuple[str, ...] = (),
    ) -> AdapterVersion:
        """Register uploaded files (in a :meth:`staging` directory); they are kept as the version's source."""
        check_name(name)
        self.registry.check_owner(name, tenant)
        self.validator.validate(staging)  # nothing is kept for files that would be refused
        uri, new = self.uploads.keep(staging, content_digest(staging))
        try:
            return self.register_staged(staging, name, source=uri, tenant=tenant, tags=tags, aliases=aliases)
        except BaseException:
            if new:
                self.uploads.discard(uri)
            raise

    def tenant(self, name: str) -> str | None:
        """The tenant that owns adapter ``name`` (``None``: public); ``AdapterNotFound`` if unregistered.

        Reads the registry only: nothing is fetched, so callers can check
        access before touching any source.
        """
        return self.registry.owner(name)

    # -- resolving ----------------------------------------------------------------------

    def version(self, ref: str, *, register_for: Claim | None = None) -> AdapterVersion:
        """The version a reference names.

        An unknown bare name is looked up in the sources and registered on
        demand (if ``on_demand`` is set) for ``register_for``'s tenant;
        without a claim nothing is looked up. A name registered meanwhile by
        someone else is returned as it is: callers check its owner.
        """
        parsed = AdapterRef.parse(ref)
        try:
            return self.registry.get(parsed)
        except AdapterNotFound:
            if register_for is None or not (self.settings.on_demand and parsed.alias == LATEST):
                raise
        name_lock = self._name_locks[zlib.crc32(parsed.name.encode()) % NAME_LOCK_STRIPES]
        with name_lock:  # one fetch per name, however many requests ask at once
            if parsed.name in self.registry.names():  # registered meanwhile (or known but missing the ref)
                return self.registry.get(parsed)
            uri = self.sources.find(parsed.name)
            if uri is None:
                raise AdapterNotFound(
                    f"adapter {parsed.name!r} is not registered and no configured source has it "
                    f"({'; '.join(s.describe() for s in self.sources.sources)})",
                    param="model",
                )
            return self.register(uri, parsed.name, tenant=register_for.tenant, tags={"registered_by": "on_demand"})

    def acquire_files(self, version: AdapterVersion) -> Path:
        """Lease a version's local files (fetched if not cached); pair with ``cache.release(version.version)``."""
        if version.legacy_digest:
            raise LegacyDigest(
                f"{version.name}@{version.version[:16]} was registered under an older digest format and its files "
                f"could not be re-hashed when the store was upgraded (see the log); register its files again "
                f"(POST /v1/adapters or loraserve adapters register) and delete this version",
                param="model",
            )
        return self.cache.acquire(version)

    def acquire(self, ref: str, *, register_for: Claim | None = None) -> ResolvedAdapter:
        """Resolve ``ref`` (see :meth:`version`) to local files and lease them; pair with :meth:`release`."""
        version = self.version(ref, register_for=register_for)
        path = self.acquire_files(version)
        return ResolvedAdapter(name=version.name, version=version.version, path=path, metadata=version.metadata)

    def release(self, adapter: ResolvedAdapter) -> None:
        self.cache.release(adapter.version)

    @contextmanager
    def lease(self, ref: str, *, register_for: Claim | None = None) -> Iterator[ResolvedAdapter]:
        adapter = self.acquire(ref, register_for=register_for)
        try:
            yield adapter
        finally:
            self.release(adapter)

    # -- managing -----------------------------------------------------------------------

    def set_alias(self, name: str, alias: str, ref: str, *, expected: str | None = None) -> AdapterVersion:
        return self.registry.set_alias(name, alias, ref, expected=expected)

    def pin(self, ref: str, pinned: bool = True) -> AdapterVersion:
        return self.registry.set_pinned(ref, pinned)

    def pin_configured(self) -> list[ResolvedAdapter]:
        """Pin ``settings.pinned`` and make sure their files are on disk (start-up preloading)."""
        loaded = []
        for ref in self.settings.pinned:
            version = self.pin(ref)
            with self.lease(version.ref) as adapter:
                loaded.append(adapter)
        return loaded

    def delete(self, ref: str) -> AdapterVersion:
        """Remove a version from the registry and its files from the cache; refused while pinned or in use."""
        version = self.registry.get(ref)
        if self.cache.in_use(version.version):
            raise AdapterInUse(
                f"{version.name}@{version.version[:16]} is serving requests; retry when they end",
                param="version",
            )
        self.registry.delete(version.ref)
        if not any(v.version == version.version for v in self.registry.all_versions()):
            with contextlib.suppress(AdapterInUse):  # leased between the check and now: eviction removes it later
                self.cache.remove(version.version)
            if self.uploads.allows(version.source):
                self.uploads.discard(version.source)
        return version

    def list(self) -> list[AdapterVersion]:
        return self.registry.all_versions()

    def record_health(
        self, ref: str, state: HealthState, *, reason: str | None = None, latency_s: float | None = None
    ) -> HealthRecord:
        version = self.registry.get(ref)
        return self.registry.record_health(version.name, version.version, state, reason=reason, latency_s=latency_s)

    def health(self, ref: str) -> HealthRecord:
        version = self.registry.get(ref)
        return self.registry.health(version.name, version.version)
