"""Adapters: names, versions and files, from registration to a directory vLLM can load.

It owns the registry (SQLite: adapters, versions, aliases, owners, health),
the validation of a LoRA checkpoint against the base model, the sources
adapters are fetched from (local paths, S3), the content digest, and the
local cache with its memory budget, behind the store façade the server opens.
It is a library with no opinion on HTTP or inference: it never imports vLLM or
FastAPI, nor anything of ``serving``, ``checkpoints`` or ``loadtests``
(``tests/test_boundaries.py``), so it runs and tests without an engine.
"""

from adapter_store.catalog import AdapterCatalog, ServedAdapter
from adapter_store.digest import content_digest
from adapter_store.errors import (
    AdapterInUse,
    AdapterNotFound,
    AdapterPinned,
    AdapterStoreError,
    AmbiguousVersion,
    CacheFull,
    InvalidAdapter,
    InvalidRef,
    LegacyDigest,
    OwnershipConflict,
    SourceError,
    VersionConflict,
)
from adapter_store.models import AdapterMetadata, AdapterVersion, Claim, HealthRecord, ResolvedAdapter
from adapter_store.refs import AdapterRef
from adapter_store.registry import AdapterRegistry
from adapter_store.settings import StoreSettings
from adapter_store.store import AdapterStore
from adapter_store.validation import AdapterValidator, BaseModelSpec

__all__ = [
    "AdapterCatalog",
    "AdapterInUse",
    "AdapterMetadata",
    "AdapterNotFound",
    "AdapterPinned",
    "AdapterRef",
    "AdapterRegistry",
    "AdapterStore",
    "AdapterStoreError",
    "AdapterValidator",
    "AdapterVersion",
    "AmbiguousVersion",
    "BaseModelSpec",
    "CacheFull",
    "Claim",
    "HealthRecord",
    "InvalidAdapter",
    "InvalidRef",
    "LegacyDigest",
    "OwnershipConflict",
    "ResolvedAdapter",
    "ServedAdapter",
    "SourceError",
    "StoreSettings",
    "VersionConflict",
    "content_digest",
]
