"""How the API shows an adapter version: in /v1/models and in the admin adapters API alike."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel

from adapter_store import AdapterStore, AdapterVersion, CatalogEntry, HealthState


class AdapterInfo(BaseModel):
    """What the store knows of the version a bare adapter name serves (its ``latest``)."""

    version: str  # sha256 of the files
    aliases: list[str]
    base_model: str
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    created: int
    checksum: str
    tags: dict[str, str]
    health: Literal["ok", "failed", "unchecked"]


def adapter_info(store: AdapterStore, version: AdapterVersion) -> AdapterInfo:
    """The version and metadata of ``version`` as the API shows it (blocking: reads the registry)."""
    return _info(version, store.aliases(version.name), store.health(version.name, version.version).state)


def entry_info(entry: CatalogEntry, version: AdapterVersion) -> AdapterInfo:
    """:func:`adapter_info` from a catalog entry of the version's name (no registry read)."""
    return _info(version, entry.aliases, entry.health_of(version.version).state)


def _info(version: AdapterVersion, aliases: Mapping[str, str], health: HealthState) -> AdapterInfo:
    meta = version.metadata
    return AdapterInfo(
        version=version.version,
        aliases=sorted(alias for alias, digest in aliases.items() if digest == version.version),
        base_model=meta.base_model,
        rank=meta.rank,
        alpha=meta.alpha,
        target_modules=list(meta.target_modules),
        size_bytes=meta.size_bytes,
        created=int(version.created_at),
        checksum=version.checksum,
        tags=version.tags,
        health=health,
    )
