"""The view of the store that serving's request path uses: model name → leased local adapter files.

A request names ``adapter``, ``adapter@version`` or ``adapter@alias``; the
catalog resolves it to a content-addressed version (:meth:`find`), says who
may use it (:meth:`owner`), and leases its files for the life of the request
(:meth:`acquire` / :meth:`release`): a leased version is never evicted from
the disk cache, so the engine can load it at any point while the request runs.
The engine keys its integer LoRA ids on (name, version), so a new version
never reuses an old version's slot or prefix-cache blocks.

Everything here may block (a fetch, the registry's lock): async callers use a
worker thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from adapter_store.errors import AdapterNotFound, InvalidRef
from adapter_store.models import AdapterVersion, Claim, HealthRecord
from adapter_store.store import AdapterStore


@dataclass(frozen=True)
class ServedAdapter:
    """An adapter version resolved to immutable local files, leased while a request uses it."""

    name: str
    version: str  # full sha256 of the files
    path: Path
    source: str = ""  # where the files came from (shown as ``root`` in /v1/models)
    size_bytes: int = 0


class AdapterCatalog:
    """Resolves references against an :class:`AdapterStore`, with each adapter's owning tenant.

    The owner is the registry's, set on the adapter name by its first
    registration (config adapters register with their configured tenant).
    """

    def __init__(self, store: AdapterStore) -> None:
        self.store = store

    def find(self, ref: str, *, register_for: Claim | None = None) -> AdapterVersion | None:
        """The version ``ref`` names; ``None`` if none matches.

        An unknown name is registered on demand for ``register_for`` only
        (see :meth:`AdapterStore.version`). Other store errors (a source
        failing, an invalid adapter found on demand) propagate: they are not
        "no such model".
        """
        try:
            return self.store.version(ref, register_for=register_for)
        except (AdapterNotFound, InvalidRef):
            return None

    def owner(self, name: str) -> str | None:
        """The tenant ``name`` belongs to; ``None`` for a public (or unknown) adapter. Never fetches."""
        try:
            return self.store.tenant(name)
        except (AdapterNotFound, InvalidRef):
            return None

    def health(self, version: AdapterVersion) -> HealthRecord:
        return self.store.registry.health(version.name, version.version)

    def acquire(self, version: AdapterVersion) -> ServedAdapter:
        """Lease the version's files (fetching them if the disk cache lacks them); pair with :meth:`release`."""
        path = self.store.acquire_files(version)
        return ServedAdapter(
            name=version.name,
            version=version.version,
            path=path,
            source=version.source,
            size_bytes=version.metadata.size_bytes,
        )

    def release(self, adapter: ServedAdapter) -> None:
        self.store.cache.release(adapter.version)

    def __iter__(self) -> Iterator[AdapterVersion]:
        """The latest version of every registered adapter."""
        for name in self.store.registry.names():
            yield self.store.registry.get(name)

    def __len__(self) -> int:
        return len(self.store.registry.names())
