"""Typed errors of the adapter store.

Serving maps each class to one HTTP status (``serving/api/errors.py``); nothing
here knows about HTTP. Every message gives the value, the limit and the fix, so
an operator can act on it without reading code. ``param`` names the field of a
request or of ``adapter_config.json`` that is at fault, when there is one.
"""

from __future__ import annotations


class AdapterStoreError(Exception):
    """Base of every error the store raises on purpose."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRef(AdapterStoreError):
    """An adapter reference (``name``, ``name@version``, ``name@alias``) is malformed."""


class AdapterNotFound(AdapterStoreError):
    """No adapter, version or alias matches a reference."""


class AmbiguousVersion(AdapterStoreError):
    """A version prefix matches more than one version of an adapter."""


class InvalidAdapter(AdapterStoreError):
    """Adapter files fail validation; nothing was registered.

    ``reason`` is a short machine-readable code (``pickle_weights``,
    ``rank_too_large``, ``wrong_base_model``, ...), ``param`` the offending key
    or file.
    """

    def __init__(self, message: str, *, reason: str, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.reason = reason


class VersionConflict(AdapterStoreError):
    """An update lost a race or would break an invariant (e.g. deleting an aliased version)."""


class OwnershipConflict(VersionConflict):
    """A registration names an adapter that belongs to another tenant (or is public while it names one).

    Ownership belongs to the name and is set once, by its first registration;
    every later version inherits it.
    """


class LegacyDigest(AdapterStoreError):
    """A version registered under an older content-digest format whose files could not be re-hashed.

    It stays registered (nothing is silently dropped) but is not served until
    an admin registers its files again.
    """


class AdapterInUse(AdapterStoreError):
    """A version is leased by running requests and cannot be deleted or evicted."""


class AdapterPinned(AdapterStoreError):
    """A version is pinned and cannot be deleted; unpin it first."""


class SourceError(AdapterStoreError):
    """A source refused a location (outside its roots or prefixes) or failed to fetch it."""


class CacheFull(AdapterStoreError):
    """The disk budget cannot hold a version because pinned or leased versions fill it."""


class RegistryUnavailable(AdapterStoreError):
    """The registry database cannot be reached (PostgreSQL down, network cut); nothing was changed.

    Serving answers 503 so clients retry; adapters already known keep being
    served from memory meanwhile.
    """
