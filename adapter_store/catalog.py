"""The adapters a server offers, each pinned to a content-addressed version.

A version is the sha256 over an adapter directory's files (names and bytes),
so two different sets of weights can never share a version, and the engine can
key its integer LoRA ids on it: vLLM's prefix cache then never serves one
version's KV blocks to another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ServedAdapter:
    """An adapter resolved to immutable files."""

    name: str
    version: str
    path: Path


def content_digest(directory: Path) -> str:
    """sha256 over the relative names and bytes of every file under ``directory``."""
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(file.relative_to(directory).as_posix().encode() + b"\0")
        with file.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


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
