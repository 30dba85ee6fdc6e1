"""The servable catalog: what a request for a known adapter needs, in memory.

Resolving a request's model through the registry costs several SQLite reads
(owner, alias, version, health) and, because SQLite blocks, a worker-thread
hop per request. The catalog keeps one :class:`CatalogEntry` per adapter name
(owner, aliases, versions, health), read from the registry in one snapshot the
first time the name is resolved, so every later request for it is a few dict
lookups on the caller's thread.

It is invalidated by the registry's change feed (``adapter_store.changes``):
SQLite's data version, or PostgreSQL's notifications, so a change through
this store, another thread, another process or another replica reaches the
next lookup (within milliseconds on PostgreSQL). Every entry is kept with the
feed's stamp for its name taken *before* its snapshot began, and served only
while that stamp has not moved: an entry read while a change commits is
therefore never served as current.

While the registry is unreachable (an outage: the feed knows it, or a read
just failed), every adapter this replica knows is served as last known
(logged once per outage): the newer of its own entry and the last full
listing's (:meth:`Catalog.listing`, which a background thread keeps read
while the registry can fail, so a replica knows every adapter registered up
to a second before the outage, even one it never served). Everything a
request needs to serve a version (owner, aliases, versions with their source
URIs, health) is in an entry; its files come from the uploads store or the
source as usual. A name the last knowledge does not hold, or whose owner the
caller may not use, is refused with ``RegistryUnavailable`` (the same answer
for both, so an outage never tells a caller which names exist), at once while
the feed knows of the outage, so no request waits for a connection attempt
to fail. The listing itself is served as last read too (``/v1/models``).
Once the feed reconnects every entry is stale and read again.

What the disk cache holds is not cached here: the cache's own in-memory
tables answer that (and take the lease) in O(1).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from adapter_store.changes import Changes
from adapter_store.errors import RegistryUnavailable
from adapter_store.models import AdapterVersion, HealthRecord
from adapter_store.refs import AdapterRef


@dataclass(frozen=True)
class CatalogEntry:
    """One adapter name as the registry held it at one moment: owner, versions, aliases, health."""

    name: str
    owner: str | None  # the tenant that owns the name; None: public
    versions: Mapping[str, AdapterVersion]  # full digest -> version
    aliases: Mapping[str, str]  # alias (``latest`` included) -> full digest
    health: Mapping[str, HealthRecord]  # full digest -> last health check (absent: unchecked)

    def resolve(self, ref: AdapterRef) -> AdapterVersion | None:
        """The version ``ref`` names; ``None`` if it names none here, or a version prefix names several.

        ``None`` sends the caller to the registry, whose error says exactly what is wrong.
        """
        if ref.alias is not None:
            digest = self.aliases.get(ref.alias)
            return None if digest is None else self.versions.get(digest)
        assert ref.version is not None
        found = self.versions.get(ref.version)
        if found is not None:
            return found
        matches = [v for digest, v in self.versions.items() if digest.startswith(ref.version)]
        return matches[0] if len(matches) == 1 else None

    def health_of(self, digest: str) -> HealthRecord:
        return self.health.get(digest, HealthRecord())


# name -> the entry read from the registry, or None if the name is not registered
Snapshot = Callable[[str], CatalogEntry | None]
# every registered name's entry, in code-point order of the names
SnapshotAll = Callable[[], list[CatalogEntry]]
# whether a caller may use an adapter of this owner (None: public)
MayUse = Callable[[str | None], bool]


logger = logging.getLogger(__name__)


MERGE_MAX_NAMES = 64
"""Up to this many changed names, a stale listing reads each again (a few queries per name, about a
millisecond on PostgreSQL) rather than the whole listing (about 0.2 s at 10,000 versions, quiet
``loadtests.bench_registry``)."""


@dataclass(frozen=True)
class _Held:
    """One name's entry, the feed's stamp taken before it was read, and the catalog's read number (newer: higher)."""

    entry: CatalogEntry
    stamp: int
    read: int


@dataclass(frozen=True)
class _Listing:
    """Every name's entry, the feed's ``stamp_any()`` taken before they were read, and the read number."""

    entries: list[CatalogEntry]
    by_name: Mapping[str, CatalogEntry]
    stamp: int
    read: int


class Catalog:
    """Catalog entries by name, each served while the change feed's stamp for its name stays where it was read.

    Owns ``changes`` (closes it). ``keep_listing_s``: re-read the listing in a background thread this often
    whenever the registry changed, so an outage finds it current (for a registry that can be unreachable).
    """

    def __init__(
        self, snapshot: Snapshot, changes: Changes, *, snapshot_all: SnapshotAll, keep_listing_s: float | None = None
    ) -> None:
        self._snapshot = snapshot
        self._snapshot_all = snapshot_all
        self._changes = changes
        self._lock = threading.Lock()
        self._reads = itertools.count(1)
        # stale ones stay: an outage serves them
        self._entries: dict[str, _Held] = {}
        self._listing: _Listing | None = None
        self._logged_outage: int | None = None
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None
        if keep_listing_s is not None:
            self._keeper = threading.Thread(
                target=self._keep_listing, args=(keep_listing_s,), name="registry-listing", daemon=True
            )
            self._keeper.start()

    def close(self) -> None:
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join()
        with self._lock:
            self._changes.close()
            self._entries.clear()

    def _keep_listing(self, interval_s: float) -> None:
        """Read the listing again whenever the registry changed (from memory, and no I/O, while it has not)."""
        while not self._stop.wait(interval_s):
            try:
                self.listing()
            except RegistryUnavailable:
                pass  # an outage before the first listing: the feed logs it, and this tries again
            except Exception:  # never leave an outage without a listing for a bug's sake: logged, tried again
                logger.exception("could not read the adapter listing; trying again")

    def get(self, name: str) -> CatalogEntry | None:
        """The entry of ``name`` if it is in memory and current; ``None``: ask :meth:`load`. Never blocks on I/O.

        During an outage the entry as last known (``None`` if unknown then).
        """
        with self._lock:
            held = self._entries.get(name)
            if held is not None and self._changes.stamp(name) == held.stamp:
                return held.entry
            outage = self._changes.outage
            if outage is None:
                return None
            self._log_outage(outage)
            return self._last_known(name)

    def _last_known(self, name: str) -> CatalogEntry | None:
        """The newest knowledge of ``name``: its own entry or the last listing's, whichever was read later.

        ``None`` if the newer of the two does not hold it (deleted since the other was read, or never known).
        Call with the lock held.
        """
        held, listing = self._entries.get(name), self._listing
        if listing is not None and (held is None or listing.read > held.read):
            return listing.by_name.get(name)
        return None if held is None else held.entry

    def _log_outage(self, outage: int) -> None:
        if outage != self._logged_outage:
            self._logged_outage = outage
            logger.warning("registry unreachable: serving adapters as last known until it is back")

    def listing(self) -> list[CatalogEntry]:
        """Every registered name's entry, in code-point order: from memory while nothing in the registry has
        changed since it was read, else read again in one snapshot (blocking).

        Any change to any name makes the listing stale (on SQLite any commit does). Where the feed tells
        names apart (PostgreSQL) and at most :data:`MERGE_MAX_NAMES` names changed, the next call reads just
        those names again into it (a write costs every replica a few queries, not a re-read of every
        version); otherwise it reads it all again, in a few queries whatever the number of adapters. A
        listing read while nothing committed also refreshes each name's entry, so the first request for a
        listed name needs no registry read. While the registry is unreachable, the listing as last read
        (``RegistryUnavailable`` if there is none): it may name an adapter deleted meanwhile or miss one
        registered meanwhile, which is what every replica serves then anyway.
        """
        with self._lock:
            held = self._listing
            if held is not None and held.stamp == self._changes.stamp_any():
                return held.entries
            outage = self._changes.outage
            if outage is not None and held is not None:
                self._log_outage(outage)
                return held.entries
        self._check_reachable("listed")
        with self._lock:
            before, read = self._changes.stamp_any(), next(self._reads)
            changed = None if held is None else self._changes.changed_since(held.stamp)
        try:
            if held is not None and changed is not None and len(changed) <= MERGE_MAX_NAMES:
                entries = self._merged(held, changed)
            else:
                entries = self._snapshot_all()
        except RegistryUnavailable:
            with self._lock:
                if self._listing is None:
                    raise
                return self._listing.entries
        with self._lock:
            self._listing = _Listing(entries, {entry.name: entry for entry in entries}, before, read)
            if self._changes.stamp_any() == before:  # nothing moved while reading: each name is current too
                self._entries = {entry.name: _Held(entry, self._changes.stamp(entry.name), read) for entry in entries}
        return entries

    def _merged(self, held: _Listing, changed: frozenset[str]) -> list[CatalogEntry]:
        """``held`` with each ``changed`` name read again (a deleted one dropped), in code-point order.

        Correct under the stamp taken before these reads for the same reason a full read is: every name
        not in ``changed`` has not moved since ``held`` was read, and one that moves while this reads is
        in the next ``changed_since``.
        """
        by_name = dict(held.by_name)
        for name in changed:
            entry = self._snapshot(name)
            if entry is None:
                by_name.pop(name, None)
            else:
                by_name[name] = entry
        return [by_name[name] for name in sorted(by_name)]

    def _check_reachable(self, what: str) -> None:
        if self._changes.outage is not None:
            raise self._unreachable(what)

    @staticmethod
    def _unreachable(what: str) -> RegistryUnavailable:
        return RegistryUnavailable(
            f"The adapter registry cannot be reached, so adapters cannot be {what}; "
            "adapters already registered are still served. Retry shortly."
        )

    def load(self, name: str, may_use: MayUse | None = None) -> CatalogEntry | None:
        """Read ``name`` from the registry (blocking) and keep it; ``None`` if it is not registered.

        While the registry is unreachable, the entry as last known, at once (without trying the database)
        while the change feed knows of the outage; ``RegistryUnavailable`` if it is unknown then, or if
        ``may_use`` refuses its owner (one answer for both: an outage must not tell which names exist).
        """
        if self._changes.outage is None:
            with self._lock:
                before, read = self._changes.stamp(name), next(self._reads)
            try:
                entry = self._snapshot(name)
            except RegistryUnavailable as e:
                return self._known_during_outage(name, may_use, e)
            with self._lock:
                if entry is None:
                    self._entries.pop(name, None)
                else:  # under the stamp read before the snapshot: if anything committed meanwhile, it is stale
                    self._entries[name] = _Held(entry, before, read)
            return entry
        return self._known_during_outage(name, may_use, self._unreachable("looked up"))

    def _known_during_outage(self, name: str, may_use: MayUse | None, error: RegistryUnavailable) -> CatalogEntry:
        with self._lock:
            entry = self._last_known(name)
            outage = self._changes.outage
            if outage is not None:
                self._log_outage(outage)
        if entry is None or (may_use is not None and not may_use(entry.owner)):
            raise error
        return entry
