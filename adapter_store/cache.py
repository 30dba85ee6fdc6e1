"""The disk tier: local copies of adapter versions, bounded by a byte budget, LRU-evicted.

vLLM keeps active adapters in ``max_loras`` slots and ``max_cpu_loras`` in host
memory; it loads them from a local path. This cache is the tier under those:
``<cache>/<sha256>/`` holds one version's files, fetched from its source into a
staging directory, checked against the version's digest and validated, then
renamed into place (a rename within one filesystem is atomic, so a reader never
sees half an adapter). Before anything is added, least-recently-used entries are deleted
until it fits: the bytes on disk never exceed the budget. Entries that are
pinned, or leased by running requests, are never evicted; if those alone fill
the budget the fetch fails with :class:`CacheFull` instead.

A hit is checked before it is handed out: the stat signature (name, size,
mtime, inode) of every file is compared with the one recorded when the files
were verified, and any change (a file swapped, truncated or rewritten in
place) re-hashes the directory. Files that no longer match their digest are
dropped and fetched again from the source, whose bytes must match the digest
too; if they do not, the version cannot be served (``checksum_mismatch``).
The check costs a few ``stat`` calls per request, not a hash.

Every file set is validated (the ``check`` hook, the store's validator) before
it enters the cache, however it comes: registered, fetched again after an
eviction, or left on disk by a previous run. A matching digest is not enough:
files are validated once at registration, but the digest scheme may change,
and what a refetch or an old cache directory holds was never checked by this
process; the engine must never load files that were not (a pickle weights file
beside no safetensors would be ``torch.load``-ed).

Leases and LRU order live in this process: one serving process owns a cache
directory (the registry, not the cache, is what worker processes share).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from adapter_store.digest import content_digest, directory_size
from adapter_store.errors import AdapterInUse, CacheFull, InvalidAdapter
from adapter_store.models import AdapterVersion

logger = logging.getLogger(__name__)

# (source URI, empty destination directory) -> None: copies the adapter's files.
Fetcher = Callable[[str, Path], None]
# A staged adapter directory -> anything; raises InvalidAdapter if its files may not be served.
Check = Callable[[Path], object]
# Per file: (relative name, size, mtime_ns, inode); equal signatures mean untouched files.
Signature = tuple[tuple[str, int, int, int], ...]
_HEX = frozenset("0123456789abcdef")
TOUCH_INTERVAL_S = 60.0  # how stale the LRU order a restart reads back may be (see DiskCache._touch)


def file_signature(directory: Path) -> Signature:
    """What changes when any file under ``directory`` is replaced, truncated or rewritten."""
    entries = []
    for parent, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(parent, name)
            stat = os.lstat(path)
            entries.append((os.path.relpath(path, directory), stat.st_size, stat.st_mtime_ns, stat.st_ino))
    return tuple(sorted(entries))


@dataclass
class _FetchLock:
    """One version's fetch lock and how many callers hold or wait for it (dropped at zero)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    holders: int = 0


@dataclass
class CacheStats:
    """Counters since start-up (serving exports them as metrics)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    evicted_bytes: int = 0
    corrupt: int = 0  # cached copies that no longer matched their digest


class DiskCache:
    """Digest-keyed adapter directories under ``cache_dir``, at most ``budget_bytes`` in all."""

    def __init__(
        self,
        cache_dir: Path,
        staging_dir: Path,
        budget_bytes: int,
        fetch: Fetcher,
        *,
        check: Check,
        pinned: Callable[[], set[str]] = set,
        lease_wait_s: float = 0.0,
        touch_interval_s: float = TOUCH_INTERVAL_S,
    ) -> None:
        self.cache_dir = cache_dir
        self.lease_wait_s = lease_wait_s
        self.touch_interval_s = touch_interval_s
        self.staging_dir = staging_dir
        self.budget_bytes = budget_bytes
        self._fetch = fetch
        self._check = check
        self._pinned = pinned
        self._lock = threading.Lock()
        self._released = threading.Condition(self._lock)  # a lease ended: leased bytes may be evictable now
        self._fetch_locks: dict[str, _FetchLock] = {}
        self._entries: OrderedDict[str, int] = OrderedDict()  # digest -> bytes, least recently used first
        self._leases: dict[str, int] = {}
        self._signatures: dict[str, Signature] = {}  # digest -> signature when last verified
        self._touched: dict[str, float] = {}  # digest -> monotonic time of its last utime
        self._reserved = 0
        self._measure_lock = threading.Lock()  # one walk at a time; never held with _lock
        self._measured = (-float("inf"), 0)  # (monotonic time, bytes) of the last bytes_on_disk walk
        self.stats = CacheStats()
        cache_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging_dir, ignore_errors=True)  # leftovers of a crash: never complete
        staging_dir.mkdir(parents=True, exist_ok=True)
        self._scan()

    def _scan(self) -> None:
        """Adopt what a previous run left, oldest first; drop anything whose bytes no longer match its name,
        or that fails validation."""
        found = []
        for path in self.cache_dir.iterdir():
            if self._intact_and_valid(path):
                found.append((path.stat().st_mtime, path.name, directory_size(path)))
            else:
                logger.warning("removing %s from the adapter cache: not a complete, intact, valid version", path)
                _remove(path)
        for _, digest, size in sorted(found):
            self._entries[digest] = size
            self._signatures[digest] = file_signature(self.cache_dir / digest)
        self._trim_to_budget()

    def _intact_and_valid(self, path: Path) -> bool:
        if path.is_symlink() or not path.is_dir() or len(path.name) != 64 or not set(path.name) <= _HEX:
            return False
        if content_digest(path) != path.name:
            return False
        try:
            self._check(path)
        except InvalidAdapter as e:
            logger.warning("cached adapter version %s fails validation: %s", path.name[:16], e.message)
            return False
        return True

    # -- measuring ----------------------------------------------------------------------

    def bytes_on_disk(self, max_age_s: float = 0.0) -> int:
        """Measured, not counted: the bytes of every file under the cache directory.

        A walk of every file (about 0.2 s at 10,000 versions), so a caller that asks often (a page of
        ``GET /v1/adapters``) takes a measurement up to ``max_age_s`` old; 0: walk now.
        """
        with self._measure_lock:
            taken_at, measured = self._measured
            if max_age_s <= 0 or time.monotonic() - taken_at > max_age_s:
                taken_at, measured = time.monotonic(), directory_size(self.cache_dir)
                self._measured = (taken_at, measured)
            return measured

    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._entries.values()) + self._reserved

    def contains(self, digest: str) -> bool:
        with self._lock:
            return digest in self._entries

    def in_use(self, digest: str) -> bool:
        with self._lock:
            return self._leases.get(digest, 0) > 0

    def digests(self) -> list[str]:
        """Cached versions, least recently used first."""
        with self._lock:
            return list(self._entries)

    # -- leasing ------------------------------------------------------------------------

    @contextmanager
    def lease(self, version: AdapterVersion) -> Iterator[Path]:
        """The version's local directory, fetched if needed; not evictable until the block ends."""
        path = self.acquire(version)
        try:
            yield path
        finally:
            self.release(version.version)

    def acquire(self, version: AdapterVersion) -> Path:
        """Take a lease (pair with :meth:`release`); fetch the files if they are not cached."""
        with self._fetch_lock(version.version):  # one download per version; others wait for it, then hit
            return self._acquire_locked(version)

    def acquire_cached(self, digest: str) -> Path | None:
        """A lease on a cached, untouched version without waiting on its fetch lock; ``None``: use :meth:`acquire`.

        The hot path of a request: the same stat-signature check as a hit of
        :meth:`acquire` (a few ``stat`` calls, no hash), but anything else
        (not cached, files touched, a fetch or check in progress that changed
        the entry) is left to :meth:`acquire`, which may block.
        """
        path = self.cache_dir / digest
        with self._lock:
            recorded = self._signatures.get(digest)
            if recorded is None or digest not in self._entries:
                return None
        try:
            signature = file_signature(path)
        except FileNotFoundError:
            return None
        with self._lock:
            if signature != self._signatures.get(digest) or digest not in self._entries:
                return None
            self._entries.move_to_end(digest)
            self._leases[digest] = self._leases.get(digest, 0) + 1
            self.stats.hits += 1
            self._touch(digest)
        return path

    def _touch(self, digest: str) -> None:
        """Date the version's directory for the LRU order a restart reads back: at most every ``touch_interval_s``.

        The in-memory order (``_entries``) is exact either way; a restart only
        needs the order to within minutes, and a ``utime`` on every hit would
        be a metadata write on each request's hot path. Called with the lock held.
        """
        now = time.monotonic()
        last = self._touched.get(digest)
        if last is None or now - last >= self.touch_interval_s:
            self._touched[digest] = now
            os.utime(self.cache_dir / digest)

    @contextmanager
    def _fetch_lock(self, digest: str) -> Iterator[None]:
        """The version's own lock, kept only while someone holds or waits for it (the table stays bounded)."""
        with self._lock:
            entry = self._fetch_locks.setdefault(digest, _FetchLock())
            entry.holders += 1
        try:
            with entry.lock:
                yield
        finally:
            with self._lock:
                entry.holders -= 1
                if entry.holders == 0:
                    del self._fetch_locks[digest]

    def _acquire_locked(self, version: AdapterVersion) -> Path:
        digest = version.version
        intact = self._verify(digest)
        with self._lock:
            if intact and digest in self._entries:
                self._entries.move_to_end(digest)
                self._leases[digest] = self._leases.get(digest, 0) + 1
                self.stats.hits += 1
                self._touch(digest)
                return self.cache_dir / digest
            self.stats.misses += 1
            self._reserve_waiting(version.metadata.size_bytes, f"{version.name}@{digest[:16]}")
        staging = self.new_staging()
        try:
            self._fetch(version.source, staging)
            actual = content_digest(staging)
            if actual != digest:
                raise InvalidAdapter(
                    f"files fetched from {version.source} have sha256 {actual[:16]}..., but version "
                    f"{version.name}@{digest[:16]} was registered with {digest[:16]}...: the source changed "
                    "after registration. Register the new files as a new version",
                    reason="checksum_mismatch",
                    param="source",
                )
            self._check(staging)
            os.rename(staging, self.cache_dir / digest)
        except BaseException:
            _remove(staging)
            with self._lock:
                self._reserved -= version.metadata.size_bytes
            raise
        signature = file_signature(self.cache_dir / digest)
        with self._lock:
            self._reserved -= version.metadata.size_bytes
            self._entries[digest] = version.metadata.size_bytes
            self._signatures[digest] = signature
            self._leases[digest] = self._leases.get(digest, 0) + 1
        return self.cache_dir / digest

    def _verify(self, digest: str) -> bool:
        """Whether a cached entry is still intact; a damaged one is dropped (leased or not) to be refetched.

        Called under the version's fetch lock, so no fetch of it runs meanwhile.
        """
        with self._lock:
            recorded = self._signatures.get(digest)
            if digest not in self._entries:
                return False
        path = self.cache_dir / digest
        try:
            signature = file_signature(path)
        except FileNotFoundError:
            signature = None
        if signature is not None and signature == recorded:
            return True
        if signature is not None and content_digest(path) == digest:  # touched, not changed
            with self._lock:
                self._signatures[digest] = signature
            return True
        logger.error("cached adapter version %s no longer matches its sha256; dropping it", digest[:16])
        with self._lock:
            self._entries.pop(digest, None)
            self._signatures.pop(digest, None)
            self._touched.pop(digest, None)
            self.stats.corrupt += 1
        _remove(path)
        return False

    def release(self, digest: str) -> None:
        with self._lock:
            count = self._leases.get(digest, 0)
            if count <= 0:
                raise RuntimeError(f"release of {digest[:16]} without a lease")
            if count == 1:
                del self._leases[digest]
                self._released.notify_all()
            else:
                self._leases[digest] = count - 1

    def new_staging(self) -> Path:
        """An empty private directory on the cache's filesystem, for a fetch in progress."""
        path = self.staging_dir / uuid.uuid4().hex
        path.mkdir()
        return path

    def adopt(self, staging: Path, digest: str, label: str) -> Path:
        """Move a fetched directory into the cache (registration path); validated once more on the way in.

        Under the version's fetch lock: a request that found the version
        registered a moment earlier may be fetching it right now, and the two
        renames into ``cache/<digest>`` must not cross.
        """
        self._check(staging)
        size = directory_size(staging)
        with self._fetch_lock(digest), self._lock:
            if digest in self._entries:
                _remove(staging)
                self._entries.move_to_end(digest)
                return self.cache_dir / digest
            self._reserve(size, label)
            try:
                os.rename(staging, self.cache_dir / digest)
            except BaseException:
                self._reserved -= size
                raise
            self._reserved -= size
            self._entries[digest] = size
            self._signatures[digest] = file_signature(self.cache_dir / digest)
        return self.cache_dir / digest

    def remove(self, digest: str) -> None:
        """Drop a version's files (after it is deleted from the registry); refused while leased."""
        with self._lock:
            if self._leases.get(digest, 0) > 0:
                raise AdapterInUse(
                    f"version {digest[:16]} is in use by {self._leases[digest]} running request(s); retry when they end"
                )
            self._signatures.pop(digest, None)
            self._touched.pop(digest, None)
            if self._entries.pop(digest, None) is not None:
                _remove(self.cache_dir / digest)

    # -- evicting (called with the lock held) -------------------------------------------

    def _reserve_waiting(self, size: int, label: str) -> None:
        """:meth:`_reserve`, waiting up to ``lease_wait_s`` for running requests to release what blocks it.

        More distinct adapters in flight than the budget holds is back-pressure,
        not an error: the fetch waits for a lease to end. Only if pinned
        versions alone leave no room, or the wait runs out, is it ``CacheFull``.
        """
        deadline = time.monotonic() + self.lease_wait_s
        while True:
            try:
                self._reserve(size, label)
                return
            except CacheFull:
                pinned = self._pinned()
                held = sum(s for d, s in self._entries.items() if d in pinned)
                remaining = deadline - time.monotonic()
                if held + size > self.budget_bytes or remaining <= 0:
                    raise
                self._released.wait(remaining)

    def _reserve(self, size: int, label: str) -> None:
        """Make room for ``size`` bytes by evicting LRU entries; ``CacheFull`` if pinned/leased ones block it."""
        need = sum(self._entries.values()) + self._reserved + size - self.budget_bytes
        if need > 0:
            pinned = self._pinned()
            victims, freed = [], 0
            for digest, entry_size in self._entries.items():
                if freed >= need:
                    break
                if digest in pinned or self._leases.get(digest, 0) > 0:
                    continue
                victims.append(digest)
                freed += entry_size
            if freed < need:
                held = sum(s for d, s in self._entries.items() if d in pinned or self._leases.get(d, 0) > 0)
                raise CacheFull(
                    f"{label} needs {size} bytes, but the disk cache budget of {self.budget_bytes} bytes is held by "
                    f"pinned or in-use versions ({held} bytes) and fetches in progress ({self._reserved} bytes); "
                    "raise store.disk_budget_bytes or unpin adapters"
                )
            for digest in victims:
                self._evict(digest)
        self._reserved += size

    def _evict(self, digest: str) -> None:
        size = self._entries.pop(digest)
        self._signatures.pop(digest, None)
        self._touched.pop(digest, None)
        _remove(self.cache_dir / digest)
        self.stats.evictions += 1
        self.stats.evicted_bytes += size
        logger.info("evicted adapter version %s (%d bytes) from the disk cache", digest[:16], size)

    def _trim_to_budget(self) -> None:
        """After a restart with a smaller budget: drop unpinned entries, oldest first, until it fits."""
        with self._lock:
            pinned = self._pinned()
            for digest in list(self._entries):
                if sum(self._entries.values()) <= self.budget_bytes:
                    break
                if digest not in pinned:
                    self._evict(digest)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
