"""Adapters: names, versions, files. Never imports vLLM, FastAPI or anything of serving.

:class:`AdapterStore` is the one entry point: it registers adapters from their
sources (or uploads), resolves references to content-addressed versions, says
who owns each name, and leases a version's local files as a
:class:`ServedAdapter` while a request uses them. Its registry, sources,
validator and disk cache are internal. Everything it does may block (SQLite,
fetches, hashing): async callers use a worker thread.
"""

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
from adapter_store.memory import cpu_loras_for_budget
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
    "Claim",
    "DiskCacheState",
    "HealthRecord",
    "HealthState",
    "InvalidAdapter",
    "InvalidRef",
    "LegacyDigest",
    "LocalSourceSettings",
    "OwnershipConflict",
    "ServedAdapter",
    "SourceError",
    "StoreSettings",
    "VersionConflict",
    "content_digest",
    "cpu_loras_for_budget",
]
