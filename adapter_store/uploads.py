"""Where uploaded adapters are kept, so that every replica can fetch them: a directory or an S3 prefix.

An uploaded version has no other source to be fetched from again after a disk
cache evicts it, so its files are kept (outside the cache budget) until the
version is deleted. In a fleet another replica, with its own disk cache, must
be able to fetch them too: ``store.uploads`` puts them on a volume every
replica mounts, or under an S3 prefix. Either way the registry names them
``upload:<sha256>``, so its rows mean the same whatever the backend.

Uploads are content-addressed: two replicas keeping the same files at once
write the same bytes under the same digest, which is harmless. A reader never
sees half an upload: a directory is renamed into place once complete; on S3 a
completion marker ``<prefix><sha256>.complete`` is written after every file of
``<prefix><sha256>/`` and deleted before them, and an upload without it is
refused. What is fetched is untrusted all the same: the copy is confined and
byte-capped (:mod:`adapter_store.safe_copy`), and the disk cache checks the
files against their digest before anything is served.

**Keep and discard across replicas.** Identical uploads share one copy, so a
replica deleting the last version that names ``upload:<sha256>`` must not
take away files another replica is registering a version on. Every keep and
every discard of one upload holds that upload's lock in the registry
(:meth:`AdapterRegistry.upload_lock`: an advisory lock on PostgreSQL, the
write lock on SQLite), and:

* a discard happens only if, inside its locked transaction, no registered
  version references the upload;
* an uploader keeps the files (under the lock) *before* its version commits,
  and keeps them again (under the lock: a stat or one HEAD when they are
  there, which is the usual case) *after* it commits, from its staging copy.

A discard that ran between the two keeps saw no reference yet and removed the
files; the second keep writes them back. A discard after the second keep sees
the committed version and leaves them. Holding the lock while files are
written means a discard never deletes objects of a keep in progress.

**Interrupted uploads.** A replica that dies while keeping files leaves a
``.partial-*`` directory, or objects under ``<prefix><sha256>/`` with no
marker, that nothing references. :meth:`UploadSource.sweep` (run when a store
opens) removes those older than :data:`SWEEP_GRACE_S`, long past any upload
still being written; on S3 under the upload's lock, and only while its marker
is still missing.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from adapter_store.errors import SourceError
from adapter_store.safe_copy import ByteBudget, copy_directory
from adapter_store.settings import LocalUploadsSettings, S3SourceSettings, S3UploadsSettings, UploadsSettings
from adapter_store.sources import AdapterSource, S3Source

logger = logging.getLogger(__name__)

MARKER_SUFFIX = ".complete"
PARTIAL_PREFIX = ".partial-"
SWEEP_GRACE_S = 3600.0
"""Leftovers of an interrupted upload are removed once this old: no upload takes an hour to write."""
_HEX = frozenset("0123456789abcdef")

UploadLock = Callable[[str], AbstractContextManager[Callable[[], bool]]]
"""The registry's per-upload lock (``AdapterRegistry.upload_lock``): held while one upload's files are kept or
discarded; it yields whether a registered version references the upload."""


class UploadBackend(ABC):
    """Kept uploads, one folder of files per content digest."""

    @abstractmethod
    def keep(self, files: Path, digest: str) -> bool:
        """Keep a copy of the directory ``files`` as upload ``digest``; whether it was not kept already."""

    @abstractmethod
    def fetch(self, digest: str, dest: Path, *, max_bytes: int) -> None:
        """Copy a complete upload into the empty directory ``dest``; ``SourceError`` if it is missing."""

    @abstractmethod
    def discard(self, digest: str) -> None:
        """Remove an upload (after its last version is deleted); nothing if it is gone already."""

    @abstractmethod
    def describe(self) -> str:
        """Where uploads are kept, for messages."""

    @abstractmethod
    def leftovers(self, older_than: float) -> Iterator[str]:
        """What interrupted uploads left, last written before ``older_than`` (a ``time.time()``), by digest."""

    @abstractmethod
    def remove_leftover(self, leftover: str) -> None:
        """Remove one of :meth:`leftovers`, unless it has become a complete upload meanwhile."""


class LocalUploads(UploadBackend):
    """``<directory>/<sha256>/``: the store root by default, or a volume that every replica mounts."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return f"uploads under {self.directory}"

    def keep(self, files: Path, digest: str) -> bool:
        target = self.directory / digest
        if target.exists():
            return False
        partial = self.directory / f"{PARTIAL_PREFIX}{digest}-{uuid.uuid4().hex}"  # per writer: replicas share it
        shutil.copytree(files, partial)
        try:
            partial.rename(target)
        except OSError:  # another replica renamed the same files into place meanwhile
            shutil.rmtree(partial, ignore_errors=True)
            if not target.is_dir():
                raise
            return False
        return True

    def fetch(self, digest: str, dest: Path, *, max_bytes: int) -> None:
        directory = self.directory / digest
        if not directory.is_dir():
            raise SourceError(
                f"upload:{digest} is gone from {self.describe()}; upload the adapter again (or, in a fleet, point "
                "store.uploads at a directory or S3 prefix every replica shares)",
                param="source",
            )
        copy_directory(directory, dest, ByteBudget(f"upload:{digest}", max_bytes))

    def discard(self, digest: str) -> None:
        shutil.rmtree(self.directory / digest, ignore_errors=True)

    def leftovers(self, older_than: float) -> Iterator[str]:
        """Each writer's ``.partial-*`` copy is its own (the complete one is renamed away): no lock needed."""
        for partial in self.directory.glob(f"{PARTIAL_PREFIX}*"):
            if partial.stat().st_mtime < older_than:
                yield partial.name

    def remove_leftover(self, leftover: str) -> None:
        shutil.rmtree(self.directory / leftover, ignore_errors=True)


class S3Uploads(UploadBackend):
    """``<url_prefix><sha256>/`` plus the completion marker ``<url_prefix><sha256>.complete``, written last."""

    def __init__(self, settings: S3UploadsSettings) -> None:
        self.prefix = settings.url_prefix
        source_settings = S3SourceSettings(
            type="s3", url_prefixes=[settings.url_prefix], endpoint_url=settings.endpoint_url, region=settings.region
        )
        self._s3 = S3Source(source_settings, configured_at="store.uploads (url_prefix, endpoint_url, region)")
        self.bucket, self.key_prefix = S3Source.split(settings.url_prefix)

    def describe(self) -> str:
        return f"uploads under {self.prefix}"

    def _marker(self, digest: str) -> str:
        return f"{self.key_prefix}{digest}{MARKER_SUFFIX}"

    def _complete(self, digest: str) -> bool:
        from botocore.exceptions import ClientError

        marker = self._marker(digest)

        def head() -> bool:
            try:
                self._s3.client.head_object(Bucket=self.bucket, Key=marker)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise
            return True

        return self._s3.call(f"s3://{self.bucket}/{marker}", head)

    def keep(self, files: Path, digest: str) -> bool:
        if self._complete(digest):
            return False
        folder = f"{self.key_prefix}{digest}/"
        for path in sorted(p for p in files.rglob("*") if p.is_file()):
            key = folder + path.relative_to(files).as_posix()
            with path.open("rb") as body:  # one PUT per file: adapters are far below S3's 5 GB limit for it
                self._s3.call(
                    f"s3://{self.bucket}/{key}",
                    lambda k=key, b=body: self._s3.client.put_object(Bucket=self.bucket, Key=k, Body=b),
                )
        marker = self._marker(digest)  # last: until it exists, no replica fetches these files
        self._s3.call(
            f"s3://{self.bucket}/{marker}",
            lambda: self._s3.client.put_object(Bucket=self.bucket, Key=marker, Body=f"{digest}\n".encode()),
        )
        return True

    def fetch(self, digest: str, dest: Path, *, max_bytes: int) -> None:
        if not self._complete(digest):
            raise SourceError(
                f"upload:{digest} is not complete under {self.prefix}: its marker s3://{self.bucket}/"
                f"{self._marker(digest)} is missing (the upload never finished, was deleted, or was kept by a "
                "replica whose store.uploads points elsewhere); upload the adapter again",
                param="source",
            )
        self._s3.copy_folder(f"{self.prefix}{digest}/", dest, max_bytes=max_bytes)

    def discard(self, digest: str) -> None:
        """The marker first, so that a discard cut short leaves an upload no replica fetches."""
        marker = self._marker(digest)
        client = self._s3.client
        self._s3.call(f"s3://{self.bucket}/{marker}", lambda: client.delete_object(Bucket=self.bucket, Key=marker))
        folder = f"{self.key_prefix}{digest}/"

        def delete_folder() -> None:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder):
                keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})

        self._s3.call(f"{self.prefix}{digest}/", delete_folder)

    def leftovers(self, older_than: float) -> Iterator[str]:
        """Digests whose files are there but whose marker is not, the newest file older than ``older_than``."""
        newest: dict[str, float] = {}
        complete: set[str] = set()

        def scan() -> None:
            for page in self._s3.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.key_prefix
            ):
                for obj in page.get("Contents", []):
                    digest, slash, _ = obj["Key"][len(self.key_prefix) :].partition("/")
                    if slash:
                        newest[digest] = max(newest.get(digest, 0.0), obj["LastModified"].timestamp())
                    elif digest.endswith(MARKER_SUFFIX):
                        complete.add(digest.removesuffix(MARKER_SUFFIX))

        self._s3.call(self.prefix, scan)
        yield from sorted(d for d, written in newest.items() if d not in complete and written < older_than)

    def remove_leftover(self, leftover: str) -> None:
        if not self._complete(leftover):  # checked again: called under the upload's lock, after the listing
            self.discard(leftover)


def upload_backend(settings: UploadsSettings, root: Path) -> UploadBackend:
    """The backend ``store.uploads`` configures; a local one defaults to ``<root>/uploads``."""
    if isinstance(settings, LocalUploadsSettings):
        return LocalUploads(settings.path or root / "uploads")
    return S3Uploads(settings)


class UploadSource(AdapterSource):
    """Uploaded adapters as a source: ``upload:<sha256>`` URIs, fetched from the configured backend.

    It is never searched by name. Keeps and discards hold the upload's lock (see the module docstring).
    """

    scheme = "upload"

    def __init__(self, backend: UploadBackend, lock: UploadLock) -> None:
        self.backend = backend
        self._lock = lock

    def describe(self) -> str:
        return self.backend.describe()

    def uri(self, digest: str) -> str:
        return f"{self.scheme}:{digest}"

    def digest_of(self, uri: str) -> str:
        digest = uri.removeprefix(f"{self.scheme}:")
        if len(digest) != 64 or not set(digest) <= _HEX:
            raise SourceError(f"{uri!r} is not an upload (upload:<sha256>)", param="source")
        return digest

    def allows(self, uri: str) -> bool:
        return uri.startswith(f"{self.scheme}:")

    def keep(self, files: Path, digest: str) -> tuple[str, bool]:
        """Keep a validated upload; its URI, and whether it was written now (it was missing).

        Call it before the version that names it is registered, and again after that commits (see the module
        docstring): the second call restores files that a discard elsewhere removed in between.
        """
        uri = self.uri(self.digest_of(self.uri(digest)))  # digest_of refuses anything but a sha256
        with self._lock(uri):
            return uri, self.backend.keep(files, digest)

    def discard(self, uri: str) -> bool:
        """Remove the upload unless a registered version references it; whether it was removed."""
        digest = self.digest_of(uri)
        with self._lock(uri) as referenced:
            if referenced():
                return False
            self.backend.discard(digest)
            return True

    def sweep(self, grace_s: float = SWEEP_GRACE_S) -> list[str]:
        """Remove what interrupted uploads left, older than ``grace_s``; what was removed.

        Housekeeping, so a store still opens while the uploads' place cannot be read (S3 down, a wrong
        prefix): that is logged, and fetches report it with the fix when an upload is needed.
        """
        try:
            leftovers = list(self.backend.leftovers(time.time() - grace_s))
        except SourceError as e:
            logger.warning("could not look for interrupted uploads (tried again at the next start): %s", e.message)
            return []
        removed = []
        for leftover in leftovers:
            with self._lock(self.uri(leftover)):  # on S3 the digest: that upload's lock
                self.backend.remove_leftover(leftover)
            removed.append(leftover)
        if removed:
            logger.warning("removed %d interrupted upload(s) from %s: %s", len(removed), self.describe(), removed)
        return removed

    def fetch(self, uri: str, dest: Path, *, max_bytes: int) -> None:
        self.backend.fetch(self.digest_of(uri), dest, max_bytes=max_bytes)

    def find(self, name: str) -> str | None:
        return None
