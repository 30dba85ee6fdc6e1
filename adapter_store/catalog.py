"""The view of the store that serving's request path uses: model name → local adapter files.

A request names ``adapter``, ``adapter@version`` or ``adapter@alias``; the
catalog resolves it to a content-addressed version whose files are on local
disk. The engine keys its integer LoRA ids on (name, version), so a new
version never reuses an old version's slot or prefix-cache blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from adapter_store.errors import AdapterNotFound, InvalidRef
from adapter_store.store import AdapterStore


@dataclass(frozen=True)
class ServedAdapter:
    """An adapter version resolved to immutable local files."""

    name: str
    version: str  # full sha256 of the files
    path: Path
    source: str = ""  # where the files came from (shown as ``root`` in /v1/models)


class AdapterCatalog:
    """Resolves references against an :class:`AdapterStore`."""

    def __init__(self, store: AdapterStore) -> None:
        self.store = store

    def get(self, ref: str) -> ServedAdapter | None:
        """The version ``ref`` names with its files on disk; ``None`` if no adapter matches.

        Other store errors (a source failing, a full cache) propagate: they are
        not "no such model".
        """
        try:
            version = self.store.version(ref)
        except (AdapterNotFound, InvalidRef):
            return None
        # The lease ends here, not with the request: the files stay only while nothing evicts them,
        # which holds as long as serving registers no more than the disk budget (no on-demand, no
        # remote sources yet). Holding store.acquire/release across the request is issue 4's next step.
        with self.store.cache.lease(version) as path:
            return ServedAdapter(name=version.name, version=version.version, path=path, source=version.source)

    def __iter__(self) -> Iterator[ServedAdapter]:
        """The latest version of every registered adapter."""
        for name in self.store.registry.names():
            version = self.store.registry.get(name)
            path = self.store.cache.cache_dir / version.version
            yield ServedAdapter(name=name, version=version.version, path=path, source=version.source)

    def __len__(self) -> int:
        return len(self.store.registry.names())
