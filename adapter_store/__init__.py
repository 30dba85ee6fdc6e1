"""Adapters: names, versions and files, from registration to a directory vLLM can load.

It owns the registry (adapters, versions, aliases, owners, health: an SQLite
file, or PostgreSQL for a fleet, one schema migrated by Alembic) and its change feed,
the validation of a LoRA checkpoint against the base model, the sources
adapters are fetched from (local paths, S3), where uploads are kept (a
directory or an S3 prefix every replica reads), the content digest, and the
local cache with its memory budget. :class:`AdapterStore` is the one entry
point: it registers adapters, resolves references to content-addressed
versions, says who owns each name, and leases a version's local files as a
:class:`ServedAdapter` while a request uses them; everything behind it is
internal. Everything it does may block (the registry, fetches, hashing): async
callers use a worker thread. It is a library with no opinion on HTTP or
inference: it never imports vLLM or FastAPI, nor anything of ``serving``,
``checkpoints`` or ``loadtests`` (``tests/test_boundaries.py``), so it runs
and tests without an engine.
"""

from adapter_store.catalog import CatalogEntry
from adapter_store.changes import EngineEvent
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
    RegistryUnavailable,
    SourceError,
    VersionConflict,
)
from adapter_store.memory import DTYPE_BYTES, adapter_tensor_bytes, cpu_loras_for_budget, max_adapter_bytes_in_memory
from adapter_store.models import AdapterMetadata, AdapterVersion, Claim, HealthRecord, HealthState, ServedAdapter
from adapter_store.refs import ALIAS_PATTERN, NAME_PATTERN, AdapterRef
from adapter_store.settings import FALLBACK_POLICIES, LocalSourceSettings, StoreSettings
from adapter_store.store import TENANT_TAG, AdapterStore, DiskCacheState
from adapter_store.validation import BaseModelSpec

__all__ = [
    "ALIAS_PATTERN",
    "FALLBACK_POLICIES",
    "NAME_PATTERN",
    "TENANT_TAG",
    "AdapterInUse",
    "AdapterMetadata",
    "AdapterNotFound",
    "AdapterPinned",
    "AdapterRef",
    "AdapterStore",
    "AdapterStoreError",
    "AdapterVersion",
    "AmbiguousVersion",
    "BaseModelSpec",
    "CacheFull",
    "CatalogEntry",
    "EngineEvent",
    "Claim",
    "DiskCacheState",
    "HealthRecord",
    "HealthState",
    "InvalidAdapter",
    "InvalidRef",
    "LegacyDigest",
    "LocalSourceSettings",
    "OwnershipConflict",
    "RegistryUnavailable",
    "ServedAdapter",
    "SourceError",
    "StoreSettings",
    "VersionConflict",
    "DTYPE_BYTES",
    "adapter_tensor_bytes",
    "content_digest",
    "cpu_loras_for_budget",
    "max_adapter_bytes_in_memory",
]
