"""Settings of the adapter store, strict like ``serving/config.py`` which embeds them.

The store never reads files or the environment for its settings: serving loads
its YAML and passes :class:`StoreSettings` in. Credentials for S3 are the one
exception and stay out of here: boto3 reads them from the environment.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from adapter_store.errors import InvalidRef
from adapter_store.refs import NAME_PATTERN, AdapterRef
from adapter_store.registry_db import mask, parse_url

S3_PREFIX_PATTERN = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/([^/]+/)*$"
FALLBACK_POLICIES = ("error", "base")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LocalSourceSettings(_Strict):
    """Adapter directories under mounted volumes; nothing outside ``roots`` is ever read."""

    type: Literal["local"]
    roots: list[Path] = Field(min_length=1, description="Directories adapters may be read from.")


class S3SourceSettings(_Strict):
    """Adapters in S3-compatible object storage; credentials come from the environment."""

    type: Literal["s3"]
    url_prefixes: list[str] = Field(
        min_length=1, description="Allowed locations, e.g. s3://bucket/adapters/ (ending in '/')."
    )
    endpoint_url: str | None = Field(default=None, description="For S3-compatible servers (MinIO, Ceph).")
    region: str | None = None

    @field_validator("url_prefixes")
    @classmethod
    def _prefixes_are_s3_folders(cls, prefixes: list[str]) -> list[str]:
        for prefix in prefixes:
            if not re.fullmatch(S3_PREFIX_PATTERN, prefix) or "/../" in prefix or "/./" in prefix:
                raise ValueError(
                    f"url prefix {prefix!r} must look like s3://bucket/ or s3://bucket/folder/ (ending in '/')"
                )
        return prefixes


SourceSettings = Annotated[LocalSourceSettings | S3SourceSettings, Field(discriminator="type")]


class LocalUploadsSettings(_Strict):
    """Uploaded adapters kept in a directory: the store root by default, or a volume every replica mounts."""

    type: Literal["local"]
    path: Path | None = Field(default=None, description="Directory of kept uploads; default <root>/uploads.")


class S3UploadsSettings(_Strict):
    """Uploaded adapters kept under one S3 prefix, where every replica can fetch them; credentials from the
    environment, as for the S3 source."""

    type: Literal["s3"]
    url_prefix: str = Field(description="Where uploads are kept, e.g. s3://bucket/uploads/ (ending in '/').")
    endpoint_url: str | None = Field(default=None, description="For S3-compatible servers (MinIO, Ceph).")
    region: str | None = None

    @field_validator("url_prefix")
    @classmethod
    def _prefix_is_an_s3_folder(cls, prefix: str) -> str:
        if not re.fullmatch(S3_PREFIX_PATTERN, prefix) or "/../" in prefix or "/./" in prefix:
            raise ValueError(
                f"url_prefix {prefix!r} must look like s3://bucket/ or s3://bucket/folder/ (ending in '/')"
            )
        return prefix


UploadsSettings = Annotated[LocalUploadsSettings | S3UploadsSettings, Field(discriminator="type")]


class StoreSettings(_Strict):
    """Where the store keeps its registry and cache, where adapters come from, and its limits."""

    root: Path = Field(description="Directory of the disk cache and staging; of the SQLite registry by default.")
    registry: str | None = Field(
        default=None,
        description="postgresql://user@host:port/database to share one registry among replicas (the password "
        "comes from PGPASSWORD, never from here), or sqlite:///path; default: the SQLite file under root.",
    )
    sources: list[SourceSettings] = []
    uploads: UploadsSettings = Field(
        default=LocalUploadsSettings(type="local"),
        description="Where uploaded adapters are kept: a directory (shared volume) or an S3 prefix (a fleet).",
    )
    disk_budget_bytes: int = Field(default=1 << 30, gt=0, description="Most bytes the disk cache may hold.")
    max_adapter_bytes: int = Field(default=256 << 20, gt=0, description="Largest adapter accepted.")
    memory_budget_bytes: int | None = Field(
        default=None, gt=0, description="Host memory for loaded adapters; serving derives max_cpu_loras from it."
    )
    on_demand: bool = Field(default=False, description="Register unknown names found in a source on first use.")
    fallback: str = Field(default="error", description="'error', 'base' or the name of an adapter to serve instead.")
    compatible_bases: list[str] = Field(
        default=[], description="Base names adapters may declare besides the served one."
    )
    pinned: list[str] = Field(
        default=[], description="Refs kept on disk and preloaded (name, name@version, name@alias)."
    )
    busy_timeout_s: float = Field(default=30.0, gt=0, description="How long a writer waits for the registry lock.")
    lease_wait_s: float = Field(
        default=30.0,
        ge=0,
        description="How long a request waits for disk-cache room held by running requests before it fails.",
    )
    refresh_s: float = Field(
        default=5.0,
        gt=0,
        description="PostgreSQL registry: every adapter is re-read this often, in case a change notification was "
        "lost (notifications are the fast path; SQLite's data version misses nothing).",
    )

    @field_validator("fallback")
    @classmethod
    def _fallback_policy(cls, value: str) -> str:
        if value not in FALLBACK_POLICIES and not re.fullmatch(NAME_PATTERN, value):
            raise ValueError(f"fallback must be 'error', 'base' or an adapter name, got {value!r}")
        return value

    @field_validator("registry")
    @classmethod
    def _registry_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        url = parse_url(value)  # ValueError names what is accepted
        if url.password is not None:
            raise ValueError(
                f"store.registry {mask(url)!r} carries a password: leave it out of the config file and give it to "
                "the server in the PGPASSWORD environment variable (from a Secret), which libpq reads"
            )
        return value

    @field_validator("pinned")
    @classmethod
    def _pinned_are_refs(cls, refs: list[str]) -> list[str]:
        for ref in refs:
            try:
                AdapterRef.parse(ref)
            except InvalidRef as e:
                raise ValueError(e.message) from e
        return refs

    @model_validator(mode="after")
    def _limits_fit(self) -> StoreSettings:
        if self.max_adapter_bytes > self.disk_budget_bytes:
            raise ValueError(
                f"max_adapter_bytes ({self.max_adapter_bytes}) exceeds disk_budget_bytes ({self.disk_budget_bytes}): "
                "an adapter that large could never be cached; lower one or raise the other"
            )
        if self.on_demand and not self.sources:
            raise ValueError("on_demand is true but no sources are configured: add a local or s3 source")
        return self
