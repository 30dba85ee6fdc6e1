"""Adapter references: ``name``, ``name@version`` and ``name@alias``.

A version is written as hex: the full sha256 of the adapter's files or a
prefix of at least :data:`MIN_PREFIX` digits. Aliases therefore may never be
pure hex (``beta`` is an alias, ``bad`` would read as a too-short version), and
must start with a letter. A bare name means the alias :data:`LATEST`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapter_store.errors import InvalidRef

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
ALIAS_PATTERN = r"^[A-Za-z][A-Za-z0-9._-]{0,31}$"
MIN_PREFIX = 8
DIGEST_LEN = 64
LATEST = "latest"

_NAME = re.compile(NAME_PATTERN)
_ALIAS = re.compile(ALIAS_PATTERN)
_HEX = re.compile(r"^[0-9a-fA-F]+$")
# Always ``fullmatch``: with ``match``, ``$`` also matches before a trailing newline ("code\n" would pass).


def check_name(name: str, param: str = "name") -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRef(
            f"adapter name {name!r} is invalid: use 1-64 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit",
            param=param,
        )
    return name


def check_alias(alias: str, param: str = "alias") -> str:
    if not isinstance(alias, str) or not _ALIAS.fullmatch(alias) or _HEX.fullmatch(alias):
        raise InvalidRef(
            f"alias {alias!r} is invalid: use 1-32 characters from A-Z a-z 0-9 . _ -, starting with a letter "
            "and not made only of hex digits (those read as a version), e.g. 'stable' or 'canary'",
            param=param,
        )
    return alias


def check_version(version: str, param: str = "version") -> str:
    """A full digest or a prefix of at least ``MIN_PREFIX`` hex digits, lower-cased."""
    if not _HEX.fullmatch(version) or not MIN_PREFIX <= len(version) <= DIGEST_LEN:
        raise InvalidRef(
            f"version {version!r} is invalid: give the sha256 of the adapter ({DIGEST_LEN} hex digits) "
            f"or a unique prefix of at least {MIN_PREFIX} hex digits",
            param=param,
        )
    return version.lower()


@dataclass(frozen=True)
class AdapterRef:
    """A parsed reference; exactly one of ``version`` and ``alias`` is set."""

    name: str
    version: str | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, text: str, param: str = "model") -> AdapterRef:
        if not isinstance(text, str):
            raise InvalidRef(f"adapter reference must be a string, got {type(text).__name__}", param=param)
        name, sep, selector = text.partition("@")
        check_name(name, param)
        if not sep:
            return cls(name=name, alias=LATEST)
        if _HEX.fullmatch(selector):
            return cls(name=name, version=check_version(selector, param))
        return cls(name=name, alias=check_alias(selector, param))

    def __str__(self) -> str:
        return f"{self.name}@{self.version or self.alias}"
