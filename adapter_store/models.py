"""Plain records the store hands out: what validation learns about an adapter,
a registered version, the health of a version, and a version leased for serving."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

HealthState = Literal["ok", "failed", "unchecked"]


@dataclass(frozen=True)
class AdapterMetadata:
    """What validation reads from an adapter's files (nothing here is trusted from the caller)."""

    base_model: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int


@dataclass(frozen=True)
class AdapterVersion:
    """One immutable, content-addressed version of an adapter, as registered."""

    name: str
    version: str  # full sha256 over the files (see ``digest.content_digest``)
    metadata: AdapterMetadata
    source: str
    created_at: float
    tags: dict[str, str] = field(default_factory=dict)
    pinned: bool = False
    legacy_digest: bool = False  # registered under an older digest format and not re-hashed: not served

    @property
    def checksum(self) -> str:
        return f"sha256:{self.version}"

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class Claim:
    """Who an unknown name is registered for when a request finds it in a source (on demand).

    ``tenant=None`` registers it as public. Passing no claim at all means the
    caller may not trigger an on-demand registration.
    """

    tenant: str | None


@dataclass(frozen=True)
class HealthRecord:
    """Last health check of a version; ``unchecked`` until one has run."""

    state: HealthState = "unchecked"
    reason: str | None = None
    checked_at: float | None = None
    latency_s: float | None = None


@dataclass(frozen=True)
class ServedAdapter:
    """A version resolved to immutable local files, leased while a request uses it.

    What serving turns into a ``LoRARequest``: the engine keys its integer
    LoRA ids on (name, version), so a new version never reuses an old
    version's slot or prefix-cache blocks.
    """

    name: str
    version: str  # full sha256 of the files
    path: Path
    source: str = ""  # where the files came from (shown as ``root`` in /v1/models)
    size_bytes: int = 0
