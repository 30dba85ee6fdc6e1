"""Re-keying versions registered under the older content-digest format.

Registry schema 1 named versions by sha256 over ``name + b"\\0" + bytes +
b"\\0"`` per file, which two different file sets can share (the boundaries
are ambiguous). The current format (``digest.content_digest``) is
unambiguous, so every such version needs its new digest. When the store
opens, before the disk cache scans its directory, each legacy digest is:

1. read from ``cache/<old>/`` if that copy still has the old digest, otherwise
   fetched from the version's source into staging and checked the same way
   (files that no longer match what was registered are never re-keyed);
2. validated, like any new registration;
3. re-keyed in one registry transaction that also renames ``cache/<old>/``;
   an upload is kept under its new digest first, by whatever backend
   ``store.uploads`` configures (``upload:<old>`` sources become
   ``upload:<new>``), and its old copy discarded once the transaction commits.

Schema 1 kept uploads under ``<root>/uploads/<old>/``; if ``store.uploads``
now points elsewhere (an S3 prefix, a shared volume) and the old upload is not
there, it is read from that directory, so upgrading and moving uploads to
shared storage can happen in one start.

A version whose files cannot be read or pass no longer stays registered with
``legacy_digest`` set; leasing it raises :class:`LegacyDigest` telling the
admin to register the files again. Nothing registered is silently lost.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import uuid
from pathlib import Path

from adapter_store.digest import content_digest
from adapter_store.errors import AdapterStoreError, SourceError
from adapter_store.registry import AdapterRegistry
from adapter_store.safe_copy import ByteBudget, copy_directory
from adapter_store.sources import SourceSet
from adapter_store.uploads import UploadSource
from adapter_store.validation import AdapterValidator

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


def legacy_digest(directory: Path) -> str:
    """The schema-1 digest: sha256 over each file's relative name, ``\\0``, bytes, ``\\0``, in name order."""
    digest = hashlib.sha256()
    files = sorted((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.relative_to(directory).as_posix())
    for file in files:
        digest.update(file.relative_to(directory).as_posix().encode() + b"\0")
        with file.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


class DigestMigration:
    """Re-keys every ``legacy_digest`` version of one store root (see the module docstring)."""

    def __init__(
        self,
        registry: AdapterRegistry,
        validator: AdapterValidator,
        root: Path,
        sources: SourceSet,
        uploads: UploadSource,
        *,
        max_bytes: int,
    ) -> None:
        self.registry = registry
        self.validator = validator
        self.cache_dir = root / "cache"
        self.staging_dir = root / "staging"
        self.legacy_uploads = root / "uploads"  # where schema 1 kept uploads
        self.sources = sources
        self.uploads = uploads
        self.max_bytes = max_bytes

    def run(self) -> list[str]:
        """Re-key what can be re-keyed; the old digests left as ``legacy_digest`` (logged)."""
        left = []
        for old in self.registry.legacy_digests():
            try:
                self._rekey(old)
            except (AdapterStoreError, OSError) as e:
                left.append(old)
                message = e.message if isinstance(e, AdapterStoreError) else str(e)
                logger.error(
                    "version %s... was registered under the old digest format and cannot be re-hashed (%s); "
                    "it stays registered but is not served until an admin registers its files again",
                    old[:16],
                    message,
                )
        return left

    def _rekey(self, old: str) -> None:
        cached = self.cache_dir / old
        if cached.is_dir() and legacy_digest(cached) == old:
            self._commit(old, cached)
            return
        sources = {v.source for v in self.registry.all_versions() if v.version == old}
        errors = []
        for source in sorted(sources):
            staging = self.staging_dir / uuid.uuid4().hex
            staging.mkdir(parents=True)
            try:
                self._read(source, old, staging)
                if legacy_digest(staging) != old:
                    errors.append(f"{source} no longer holds the registered files")
                    continue
                self._commit(old, staging)
                return
            except AdapterStoreError as e:
                errors.append(e.message)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        raise OSError("; ".join(errors) or "no cached copy and no source")

    def _read(self, source: str, old: str, staging: Path) -> None:
        """Fetch ``source`` into ``staging``; an upload the backend lacks is read where schema 1 kept it."""
        try:
            self.sources.fetch(source, staging, max_bytes=self.max_bytes)
        except SourceError as e:
            legacy = self.legacy_uploads / old
            if not (self.uploads.allows(source) and legacy.is_dir()):
                raise
            logger.info("reading upload %s... from %s: %s", old[:16], legacy, e.message)
            copy_directory(legacy, staging, ByteBudget(source, self.max_bytes))

    def _commit(self, old: str, files: Path) -> None:
        self.validator.validate(files)
        new = content_digest(files)
        old_upload = self.uploads.uri(old)
        uploaded = new != old and any(v.source == old_upload for v in self.registry.all_versions() if v.version == old)
        if uploaded:  # before the transaction: no upload to S3 while holding the registry's write lock
            self.uploads.keep(files, new)

        def move() -> None:
            target = self.cache_dir / new
            if files != target and not target.exists():
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                files.rename(target)

        self.registry.rekey(old, new, move=move, upload_scheme=self.uploads.scheme)
        if uploaded:
            shutil.rmtree(self.legacy_uploads / old, ignore_errors=True)
            try:
                self.uploads.discard(old_upload)
            except SourceError as e:  # re-keyed all the same: only the old copy is left behind
                logger.warning("re-keyed upload %s... but could not remove its old copy: %s", old[:16], e.message)
        logger.info("re-keyed version %s... as %s... (current digest format)", old[:16], new[:16])
