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
3. re-keyed in one registry transaction that also renames ``cache/<old>/``
   and ``uploads/<old>/`` (``upload:<old>`` sources become ``upload:<new>``).

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
from adapter_store.errors import AdapterStoreError
from adapter_store.registry import AdapterRegistry
from adapter_store.sources import SourceSet, UploadSource
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
            self.staging_dir.mkdir(parents=True, exist_ok=True)
            staging = self.staging_dir / uuid.uuid4().hex
            try:
                self.sources.fetch(source, staging, max_bytes=self.max_bytes)
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

    def _commit(self, old: str, files: Path) -> None:
        self.validator.validate(files)
        new = content_digest(files)
        upload = self.uploads.directory / old

        def move() -> None:
            target = self.cache_dir / new
            if files != target and not target.exists():
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                files.rename(target)
            if upload.is_dir() and new != old:
                upload.rename(self.uploads.directory / new)

        self.registry.rekey(old, new, move=move, upload_scheme=self.uploads.scheme)
        logger.info("re-keyed version %s... as %s... (current digest format)", old[:16], new[:16])
