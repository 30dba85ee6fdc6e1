"""``AdapterStore``: the one object serving talks to.

It ties the registry (what exists), the sources (where files come from), the
validator (what may be served) and the disk cache (local files under a budget)
together; none of them is reachable from outside::

    store = AdapterStore.open(settings, base=spec, max_lora_rank=16)
    store.register("s3://bucket/adapters/code/", "code", aliases=("stable",))
    version = store.version("code@stable")        # registry only: nothing fetched
    adapter = store.acquire(version)              # ServedAdapter(name, version, path, ...)
    try:
        ...  # hand adapter.path to the engine; the files stay on disk until released
    finally:
        store.release(adapter)

A request names ``adapter``, ``adapter@version`` or ``adapter@alias``;
:meth:`AdapterStore.version` resolves it to a content-addressed version,
:meth:`AdapterStore.tenant` says who owns the name (so callers check access
before anything is fetched), and :meth:`AdapterStore.acquire` leases the
version's files for the life of the request: a leased version is never
evicted from the disk cache, so the engine can load it at any point while the
request runs.

A request for a known adapter needs none of the registry's I/O:
:meth:`AdapterStore.cached_entry` answers owner, version and health from an
in-memory catalog that the registry's change feed invalidates on every
registry change (``adapter_store.catalog``, ``adapter_store.changes``), and :meth:`AdapterStore.acquire_cached`
leases cached files with a few ``stat`` calls.

Replicas of a fleet (one PostgreSQL registry) tell each other what an admin
did to their engine: :meth:`AdapterStore.publish_engine_event` after an unload
or a pin, :meth:`AdapterStore.subscribe` to hear the others' (see
``adapter_store.changes``: best-effort, and on SQLite there are no others).

Everything else here is synchronous and may block on I/O (a fetch, hashing, the
registry's lock or its database): async callers run it in a worker thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import threading
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from adapter_store.cache import CacheStats, DiskCache
from adapter_store.catalog import Catalog, CatalogEntry
from adapter_store.changes import ENGINE_CHANNEL, EngineEvent, EngineEventKind, OnEvent, OnMissed, open_changes
from adapter_store.digest import content_digest
from adapter_store.errors import (
    AdapterInUse,
    AdapterNotFound,
    CacheFull,
    InvalidRef,
    LegacyDigest,
    RegistryUnavailable,
)
from adapter_store.migration import DigestMigration
from adapter_store.models import AdapterVersion, Claim, HealthRecord, HealthState, ServedAdapter
from adapter_store.refs import LATEST, AdapterRef, check_name
from adapter_store.registry import AdapterRegistry
from adapter_store.settings import StoreSettings
from adapter_store.sources import SourceSet
from adapter_store.uploads import UploadSource, upload_backend
from adapter_store.validation import AdapterValidator, BaseModelSpec

logger = logging.getLogger(__name__)

TENANT_TAG = "tenant"
"""Reserved tag name: the owner is the name's ``tenant`` (see the registry), never a tag."""

KEEP_LISTING_S = 1.0
"""On PostgreSQL, how often the catalog's listing is read again if the registry changed: an outage serves every
adapter the last listing holds, so a replica knows what was registered up to about this long before it began."""

NAME_LOCK_STRIPES = 64
"""On-demand registrations of one name are serialised on one of this many locks (a fixed table, however
many unknown names requests send); two names sharing a stripe merely wait for each other."""


@dataclasses.dataclass(frozen=True)
class DiskCacheState:
    """The disk cache at one moment: what it holds and its counters (serving exports them as metrics)."""

    used_bytes: int  # counted: cached versions plus space reserved for fetches in progress
    budget_bytes: int
    cached: frozenset[str]  # digests of the versions on disk
    stats: CacheStats


class AdapterStore:
    """Registered, validated, cached adapter versions."""

    def __init__(self, settings: StoreSettings, registry: AdapterRegistry, validator: AdapterValidator) -> None:
        self.settings = settings
        self._registry = registry
        self._validator = validator
        self._uploads = UploadSource(upload_backend(settings.uploads, settings.root), registry.upload_lock)
        self._sources = SourceSet(settings.sources, extra=[self._uploads])
        # Before the cache scans its directory: it drops entries whose name is not their digest.
        DigestMigration(
            registry, validator, settings.root, self._sources, self._uploads, max_bytes=settings.max_adapter_bytes
        ).run()
        # SQLite: the file's data version; PostgreSQL: LISTEN/NOTIFY (the password, if the URL has one, for libpq).
        feed = registry.path or registry.url.render_as_string(hide_password=False)
        self._changes = open_changes(feed, refresh_s=settings.refresh_s, busy_timeout_s=settings.busy_timeout_s)
        registry.fail_fast(lambda: self._changes.outage is not None)
        # owns (closes) the feed; a database that can be unreachable gets its listing kept for an outage
        self._catalog = Catalog(
            registry.snapshot,
            self._changes,
            snapshot_all=registry.snapshot_all,
            keep_listing_s=None if registry.path is not None else KEEP_LISTING_S,
        )
        self._cache = DiskCache(
            settings.root / "cache",
            settings.root / "staging",
            settings.disk_budget_bytes,
            fetch=self._fetch,
            check=self._validator.validate,
            pinned=self._pinned_digests,
            lease_wait_s=settings.lease_wait_s,
        )
        self._uploads.sweep()
        self._name_locks = tuple(threading.Lock() for _ in range(NAME_LOCK_STRIPES))
        self.replica = uuid.uuid4().hex
        """This store's id in the fleet's engine events: its own come back to it and are skipped."""

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
            settings.root,
            url=settings.registry,
            busy_timeout_s=settings.busy_timeout_s,
            configured_owners=configured_owners,
        )
        validator = AdapterValidator(
            base,
            max_lora_rank=max_lora_rank,
            max_adapter_bytes=settings.max_adapter_bytes,
            loader_check=loader_check,
        )
        return cls(settings, registry, validator)

    def close(self) -> None:
        self._catalog.close()
        self._registry.close()

    def _fetch(self, uri: str, dest: Path) -> None:
        self._sources.fetch(uri, dest, max_bytes=self.settings.max_adapter_bytes)

    def _pinned_digests(self) -> set[str]:
        """The registry's pins; during an outage those of the last listing, so eviction keeps working."""
        if self._changes.outage is None:
            try:
                return {v.version for v in self._registry.pinned()}
            except RegistryUnavailable:
                pass  # the feed has not noticed yet
        return {v.version for entry in self._catalog.listing() for v in entry.versions.values() if v.pinned}

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
        self._registry.check_owner(name, tenant)
        with self.staging() as staging:
            self._fetch(source_uri, staging)
            return self._register_staged(staging, name, source=source_uri, tenant=tenant, tags=tags, aliases=aliases)

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A private empty directory for files on their way in (a fetch, an upload); removed afterwards."""
        staging = self._cache.new_staging()
        try:
            yield staging
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def _register_staged(
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

        ``source`` records where they came from: a source URI, or the kept
        copy of an upload (:meth:`register_upload`).
        """
        check_name(name)
        if TENANT_TAG in (tags or {}):
            raise InvalidRef(f"the tag {TENANT_TAG!r} is reserved: pass the owner as tenant", param="tags")
        metadata = self._validator.validate(staging)  # an invalid adapter never reaches the registry
        version, created = self._registry.register(
            name, content_digest(staging), metadata, source=source, tags=tags, aliases=aliases, tenant=tenant
        )
        if self._uploads.allows(source):  # kept again: a discard elsewhere may have run before this committed
            self._uploads.keep(staging, version.version)
        try:
            self._cache.adopt(staging, version.version, f"{name}@{version.version[:16]}")
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
        """Register uploaded files (in a :meth:`staging` directory); they are kept as the version's source
        (before and after the version commits: see ``adapter_store.uploads``)."""
        check_name(name)
        self._registry.check_owner(name, tenant)
        self._validator.validate(staging)  # nothing is kept for files that would be refused
        uri, new = self._uploads.keep(staging, content_digest(staging))
        try:
            return self._register_staged(staging, name, source=uri, tenant=tenant, tags=tags, aliases=aliases)
        except BaseException:
            if new:
                self._uploads.discard(uri)
            raise

    def tenant(self, name: str) -> str | None:
        """The tenant that owns adapter ``name`` (``None``: public); ``AdapterNotFound`` if unregistered.

        Reads the registry only: nothing is fetched, so callers can check
        access before touching any source.
        """
        return self._registry.owner(name)

    # -- reading the registry (nothing is fetched) ---------------------------------------

    def names(self) -> list[str]:
        return self._registry.names()

    def versions(self, name: str) -> list[AdapterVersion]:
        """Every version of ``name``, newest first (empty if unregistered)."""
        return self._registry.versions(name)

    def latest(self) -> list[AdapterVersion]:
        """The latest version of every registered adapter."""
        return [self._registry.get(name) for name in self._registry.names()]

    def all_versions(self) -> list[AdapterVersion]:
        """Every registered version of every adapter."""
        return self._registry.all_versions()

    def aliases(self, name: str) -> dict[str, str]:
        """``name``'s aliases (``latest`` included) and the digests they point at."""
        return self._registry.aliases(name)

    def pinned(self) -> list[AdapterVersion]:
        return self._registry.pinned()

    def health(self, name: str, version: str) -> HealthRecord:
        """The last health check of version ``version`` (a full digest) of ``name``."""
        return self._registry.health(name, version)

    def record_health(
        self, name: str, version: str, state: HealthState, *, reason: str | None = None, latency_s: float | None = None
    ) -> HealthRecord:
        return self._registry.record_health(name, version, state, reason=reason, latency_s=latency_s)

    # -- the catalog: a request's view of a name, in memory ------------------------------

    def cached_entry(self, name: str) -> CatalogEntry | None:
        """``name``'s owner, versions, aliases and health if the catalog holds them, current; else ``None``.

        Never blocks on I/O (see ``adapter_store.catalog``): the hot path of a request for a known adapter.
        ``None`` means "ask :meth:`entry`", not "unregistered". While the registry is unreachable, the entry
        as last known (see :meth:`entry`), whoever owns it: callers check access.
        """
        return self._catalog.get(name)

    def entries(self) -> list[CatalogEntry]:
        """Every registered adapter's entry, in code-point order of the names: from memory while the registry
        has not changed since it was last listed, else the changed names read again into it (PostgreSQL,
        a few at a time) or the whole of it read in one snapshot (a few queries for any number of adapters). Blocks on a re-read: async callers use a thread. During an outage the listing as last
        read (``RegistryUnavailable`` if none was).
        """
        return self._catalog.listing()

    def entry(self, name: str, *, may_use: Callable[[str | None], bool] | None = None) -> CatalogEntry:
        """``name``'s owner, versions, aliases and health, read from the registry and kept in the catalog.

        ``AdapterNotFound`` if it is not registered. While the registry is unreachable, the entry as last
        known (its own or the last listing's: everything serving the version needs); ``RegistryUnavailable``
        if it is unknown then, or if ``may_use`` (the caller's access rule) refuses its owner: the same
        answer, so an outage never tells a caller which names exist. Blocks (registry I/O): async callers
        use a thread.
        """
        entry = self._catalog.load(name, may_use)
        if entry is None:
            raise AdapterNotFound(f"adapter {name!r} is not registered", param="name")
        return entry

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
            return self._registry.get(parsed)
        except AdapterNotFound:
            if register_for is None or not (self.settings.on_demand and parsed.alias == LATEST):
                raise
        name_lock = self._name_locks[zlib.crc32(parsed.name.encode()) % NAME_LOCK_STRIPES]
        with name_lock:  # one fetch per name, however many requests ask at once
            if parsed.name in self._registry.names():  # registered meanwhile (or known but missing the ref)
                return self._registry.get(parsed)
            uri = self._sources.find(parsed.name)
            if uri is None:
                raise AdapterNotFound(
                    f"adapter {parsed.name!r} is not registered and no configured source has it "
                    f"({'; '.join(s.describe() for s in self._sources.sources)})",
                    param="model",
                )
            return self.register(uri, parsed.name, tenant=register_for.tenant, tags={"registered_by": "on_demand"})

    def acquire(self, version: AdapterVersion) -> ServedAdapter:
        """Lease the version's local files (fetched and verified if not cached); pair with :meth:`release`."""
        if version.legacy_digest:
            raise LegacyDigest(
                f"{version.name}@{version.version[:16]} was registered under an older digest format and its files "
                f"could not be re-hashed when the store was upgraded (see the log); register its files again "
                f"(POST /v1/adapters or loraserve adapters register) and delete this version",
                param="model",
            )
        return self._served(version, self._cache.acquire(version))

    def acquire_cached(self, version: AdapterVersion) -> ServedAdapter | None:
        """:meth:`acquire` if the files are cached and untouched, without blocking; ``None``: call :meth:`acquire`.

        Costs a few ``stat`` calls and the cache's lock: no fetch, no hash, no wait on a fetch in progress.
        """
        if version.legacy_digest:
            return None  # acquire says why it cannot be served
        path = self._cache.acquire_cached(version.version)
        return None if path is None else self._served(version, path)

    def _served(self, version: AdapterVersion, path: Path) -> ServedAdapter:
        return ServedAdapter(
            name=version.name,
            version=version.version,
            path=path,
            source=version.source,
            size_bytes=version.metadata.size_bytes,
        )

    def release(self, adapter: ServedAdapter) -> None:
        self._cache.release(adapter.version)

    def is_cached(self, version: AdapterVersion) -> bool:
        """Whether the version's files are on disk now (a lease would not fetch them)."""
        return self._cache.contains(version.version)

    def disk_cache(self) -> DiskCacheState:
        return DiskCacheState(
            used_bytes=self._cache.used_bytes(),
            budget_bytes=self._cache.budget_bytes,
            cached=frozenset(self._cache.digests()),
            stats=dataclasses.replace(self._cache.stats),
        )

    def bytes_on_disk(self, max_age_s: float = 0.0) -> int:
        """Measured, not counted: the bytes of every file in the disk cache (walks the directory), or the
        last such measurement if it is at most ``max_age_s`` old."""
        return self._cache.bytes_on_disk(max_age_s)

    # -- the fleet's engine events --------------------------------------------------------

    def publish_engine_event(self, kind: EngineEventKind, version: AdapterVersion) -> None:
        """Tell every other replica to do to its engine what this one just did to ``version`` (blocks).

        ``unload`` (an unload or a delete) or ``preload`` (a pin). On
        PostgreSQL a notification on ``loraserve_engine``, delivered within
        milliseconds to every replica listening at that moment (best-effort:
        see ``adapter_store.changes``); ``RegistryUnavailable`` if the database
        cannot be reached. On SQLite there is no other replica: nothing is sent.
        """
        event = EngineEvent(kind, version.name, version.version, self.replica)
        self._registry.publish(ENGINE_CHANNEL, event.encode())

    def subscribe(self, on_event: OnEvent, on_missed: OnMissed) -> None:
        """Hear the other replicas' engine events; ``on_missed`` whenever some may have been lost.

        Both are called on the change feed's thread: hand over (e.g. with
        ``loop.call_soon_threadsafe``), never block. Events are validated before
        they get here; this store's own are skipped. ``on_missed`` means "derive
        from the registry what you can": the pinned versions.
        """

        def others(event: EngineEvent) -> None:
            if event.replica != self.replica:
                on_event(event)

        self._changes.subscribe(others, on_missed)

    # -- managing -----------------------------------------------------------------------

    def set_alias(self, name: str, alias: str, ref: str, *, expected: str | None = None) -> AdapterVersion:
        return self._registry.set_alias(name, alias, ref, expected=expected)

    def pin(self, ref: str, pinned: bool = True) -> AdapterVersion:
        """Keep (or stop keeping) the version on disk: the cache never evicts a pinned version."""
        return self._registry.set_pinned(ref, pinned)

    def pin_configured(self) -> list[AdapterVersion]:
        """Pin ``settings.pinned`` and make sure their files are on disk (start-up preloading)."""
        loaded = []
        for ref in self.settings.pinned:
            version = self.pin(ref)
            self.release(self.acquire(version))
            loaded.append(version)
        return loaded

    def delete(self, ref: str) -> AdapterVersion:
        """Remove a version from the registry and its files from the cache; refused while pinned or in use."""
        version = self._registry.get(ref)
        if self._cache.in_use(version.version):
            raise AdapterInUse(
                f"{version.name}@{version.version[:16]} is serving requests; retry when they end",
                param="version",
            )
        self._registry.delete(version.ref)
        if not any(v.version == version.version for v in self._registry.all_versions()):
            with contextlib.suppress(AdapterInUse):  # leased between the check and now: eviction removes it later
                self._cache.remove(version.version)
        if self._uploads.allows(version.source):  # unless a version (of any name, on any replica) still names it
            self._uploads.discard(version.source)
        return version
