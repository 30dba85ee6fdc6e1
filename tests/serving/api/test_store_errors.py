"""Adapter-store errors as API errors: each typed store error is one status, type and code, with its message."""

from __future__ import annotations

import pytest

import adapter_store
from adapter_store import (
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
from serving.api.errors import store_error

MAPPING = [  # (store error, HTTP status, error type, code)
    (InvalidRef("bad ref", param="model"), 400, "BadRequestError", "invalid_ref"),
    (AdapterNotFound("no such adapter", param="name"), 404, "NotFoundError", "adapter_not_found"),
    (AmbiguousVersion("prefix matches two", param="version"), 400, "BadRequestError", "ambiguous_version"),
    (InvalidAdapter("rank 64 > 16", reason="rank_too_large", param="r"), 400, "BadRequestError", "rank_too_large"),
    (SourceError("outside the roots", param="source"), 400, "BadRequestError", "source_refused"),
    (VersionConflict("alias moved", param="expected"), 409, "ConflictError", "version_conflict"),
    (OwnershipConflict("belongs to tenant 'a'", param="tenant"), 409, "ConflictError", "ownership_conflict"),
    (LegacyDigest("register again", param="model"), 409, "ConflictError", "legacy_digest"),
    (AdapterInUse("serving requests", param="version"), 409, "ConflictError", "adapter_in_use"),
    (AdapterPinned("unpin it", param="version"), 409, "ConflictError", "adapter_pinned"),
    (CacheFull("budget full", param=None), 507, "InsufficientStorageError", "cache_full"),
    (RegistryUnavailable("database down"), 503, "ServiceUnavailableError", "registry_unavailable"),
]


@pytest.mark.parametrize(("error", "status", "kind", "code"), MAPPING, ids=lambda v: type(v).__name__)
def test_each_store_error_is_one_api_error(error: AdapterStoreError, status: int, kind: str, code: str) -> None:
    api = store_error(error)
    assert (api.status, api.type, api.code) == (status, kind, code)
    assert (api.message, api.param) == (error.message, error.param)  # the store's words reach the client as-is


def test_every_store_error_the_package_exports_is_mapped() -> None:
    """A new store error without a mapping would be a 500 (KeyError) the first time it is raised."""
    exported = {
        value
        for value in vars(adapter_store).values()
        if isinstance(value, type) and issubclass(value, AdapterStoreError) and value is not AdapterStoreError
    }
    assert exported == {type(error) for error, *_ in MAPPING}
