"""The adapters a server offers, each pinned to a content-addressed version
(see ``adapter_store.digest``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from adapter_store.digest import content_digest


@dataclass(frozen=True)
class ServedAdapter:
    """An adapter resolved to immutable files."""

    name: str
    version: str
    path: Path


class AdapterCatalog:
    """Name → :class:`ServedAdapter` for the adapters named in the config."""

    def __init__(self, adapters: Iterable[tuple[str, Path]]) -> None:
        self._adapters: dict[str, ServedAdapter] = {}
        for name, path in adapters:
            self._adapters[name] = ServedAdapter(name=name, version=content_digest(path)[:16], path=path)

    def get(self, name: str) -> ServedAdapter | None:
        return self._adapters.get(name)

    def __iter__(self):
        return iter(self._adapters.values())

    def __len__(self) -> int:
        return len(self._adapters)
