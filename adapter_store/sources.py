"""Where adapter files come from: one :class:`AdapterSource` subclass per backend.

A source copies an adapter's files into a directory the store owns (a staging
directory, later renamed into the cache), so what is validated and hashed is a
private copy nobody else can change. Sources are confined: a local source reads
only under its configured roots (after resolving symlinks), an S3 source only
under its configured URL prefixes. Backends are chosen from a registry keyed on
the settings' ``type``, and URIs are routed to the source that accepts them.

The files themselves are untrusted, even from a configured source, and the copy
runs before validation: every copy goes through :mod:`adapter_store.safe_copy`
(names confined to the destination, bytes capped while copying, local files
opened without following links and checked on the descriptor read). The
adapter directory itself may be reached through a symlink that resolves inside
a root; nothing inside it may be a link, and no file may have a second name.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar
from urllib.parse import unquote, urlparse

from adapter_store.errors import SourceError
from adapter_store.refs import check_name
from adapter_store.safe_copy import (
    MAX_FILES,
    ByteBudget,
    copy_capped,
    copy_directory,
    emptied_on_failure,
    safe_parts,
    too_large,
    too_many_files,
    writable_target,
)
from adapter_store.settings import LocalSourceSettings, S3SourceSettings, SourceSettings

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"


class AdapterSource(ABC):
    """One backend adapters can be fetched from."""

    scheme: ClassVar[str]

    @abstractmethod
    def allows(self, uri: str) -> bool:
        """Whether ``uri`` lies inside this source's configured locations (no I/O)."""

    @abstractmethod
    def fetch(self, uri: str, dest: Path, *, max_bytes: int) -> None:
        """Copy the adapter at ``uri`` into the empty directory ``dest``; ``SourceError`` if refused."""

    @abstractmethod
    def find(self, name: str) -> str | None:
        """The URI of an adapter called ``name`` in this source, or ``None`` (on-demand resolution)."""

    @abstractmethod
    def describe(self) -> str:
        """The configured locations, for error messages."""


_SOURCE_TYPES: dict[str, Callable[..., AdapterSource]] = {}
"""Settings ``type`` -> the backend class, built from those settings."""


def register_source_type(settings_type: str) -> Callable[[type[AdapterSource]], type[AdapterSource]]:
    """Class decorator: the backend for settings with ``type: <settings_type>``."""

    def add(cls: type[AdapterSource]) -> type[AdapterSource]:
        _SOURCE_TYPES[settings_type] = cls
        return cls

    return add


@register_source_type("local")
class LocalSource(AdapterSource):
    """Directories under mounted volumes (the Kubernetes case), addressed as absolute paths or file:// URIs."""

    scheme = "file"

    def __init__(self, settings: LocalSourceSettings) -> None:
        self.roots = [root.resolve() for root in settings.roots]

    def describe(self) -> str:
        return "local roots " + ", ".join(str(r) for r in self.roots)

    @staticmethod
    def path_of(uri: str) -> Path:
        raw = unquote(urlparse(uri).path) if uri.startswith("file://") else uri
        path = PurePosixPath(raw)
        if ".." in path.parts:
            raise SourceError(
                f"{uri!r} contains '..'; give the adapter's path inside a configured root", param="source"
            )
        if not path.is_absolute():
            raise SourceError(f"{uri!r} is relative; give an absolute path or a file:// URI", param="source")
        return Path(raw)

    def _confined(self, path: Path, uri: str) -> Path:
        """``path`` with symlinks resolved, if that lies under a root; ``SourceError`` otherwise."""
        real = path.resolve()
        if not any(real.is_relative_to(root) for root in self.roots):
            raise SourceError(
                f"{uri!r} resolves to {real}, outside the configured {self.describe()}; "
                "put the adapter under a root or add its directory to store.sources[].roots",
                param="source",
            )
        return real

    def allows(self, uri: str) -> bool:
        try:
            self._confined(self.path_of(uri), uri)
        except SourceError:
            return False
        return True

    def fetch(self, uri: str, dest: Path, *, max_bytes: int) -> None:
        directory = self._confined(self.path_of(uri), uri)
        if not directory.is_dir():
            raise SourceError(f"{uri!r} is not a directory (resolved to {directory})", param="source")
        copy_directory(directory, dest, ByteBudget(uri, max_bytes))

    def find(self, name: str) -> str | None:
        check_name(name)
        for root in self.roots:
            candidate = root / name
            if (candidate / CONFIG_FILE).is_file() and self.allows(str(candidate)):
                return candidate.resolve().as_uri()
        return None


@register_source_type("s3")
class S3Source(AdapterSource):
    """Adapters under S3 prefixes: ``s3://bucket/prefix/name/`` holds the adapter's files."""

    scheme = "s3"

    def __init__(self, settings: S3SourceSettings, *, configured_at: str = "the source's endpoint_url") -> None:
        self.settings = settings
        self.prefixes = list(settings.url_prefixes)
        self.configured_at = configured_at  # the setting to check when a request fails
        self._client: Any = None

    def describe(self) -> str:
        return "S3 prefixes " + ", ".join(self.prefixes)

    @property
    def client(self) -> Any:
        """A boto3 client; credentials come from the environment (or instance role), never from config."""
        if self._client is None:
            import boto3

            self._client = boto3.client("s3", endpoint_url=self.settings.endpoint_url, region_name=self.settings.region)
        return self._client

    @staticmethod
    def split(uri: str) -> tuple[str, str]:
        """``s3://bucket/key/`` → (bucket, "key/"); refuses odd segments."""
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise SourceError(f"{uri!r} is not an s3://bucket/prefix/ URI", param="source")
        key = parsed.path.lstrip("/")
        if not key.endswith("/"):
            key += "/"
        parts = key.split("/")[:-1]
        if any(part in ("", ".", "..") for part in parts):
            raise SourceError(f"{uri!r} has an empty, '.' or '..' path segment", param="source")
        return parsed.netloc, key

    def allows(self, uri: str) -> bool:
        try:
            bucket, key = self.split(uri)
        except SourceError:
            return False
        return any(f"s3://{bucket}/{key}".startswith(prefix) for prefix in self.prefixes)

    def fetch(self, uri: str, dest: Path, *, max_bytes: int) -> None:
        if not self.allows(uri):
            raise SourceError(
                f"{uri!r} is outside the configured {self.describe()}; add its prefix to store.sources[].url_prefixes",
                param="source",
            )
        self.copy_folder(uri, dest, max_bytes=max_bytes)

    def copy_folder(self, uri: str, dest: Path, *, max_bytes: int) -> None:
        """Copy every object under the folder ``uri`` into ``dest``: names confined to it, bytes capped while read.

        Callers check that ``uri`` is a location they may read (:meth:`allows`, or the uploads prefix).
        """
        bucket, key = self.split(uri)
        objects = self._list(bucket, key, uri)
        if not objects:
            raise SourceError(f"no objects under {uri}; check the bucket and prefix", param="source")
        listed = sum(obj["Size"] for obj in objects)
        if listed > max_bytes:  # refused before any download; the running cap below is what holds
            raise too_large(uri, listed, max_bytes)
        budget = ByteBudget(uri, max_bytes)
        names = [(obj["Key"], safe_parts(obj["Key"][len(key) :], uri)) for obj in objects]  # all, before any write
        with emptied_on_failure(dest):
            for object_key, parts in names:
                target = writable_target(dest, parts, uri)
                body = self.call(uri, lambda k=object_key: self.client.get_object(Bucket=bucket, Key=k))["Body"]
                try:
                    self.call(uri, copy_capped, body.read, target, budget)
                finally:
                    body.close()

    def _list(self, bucket: str, key: str, uri: str) -> list[dict]:
        """The objects under ``key`` (not "directory" markers); listing stops past :data:`MAX_FILES`."""
        paginator = self.client.get_paginator("list_objects_v2")

        def first_objects() -> list[dict]:
            objects: list[dict] = []
            for page in paginator.paginate(Bucket=bucket, Prefix=key):
                objects += [obj for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]
                if len(objects) > MAX_FILES:
                    raise too_many_files(uri)
            return objects

        return self.call(uri, first_objects)

    def find(self, name: str) -> str | None:
        from botocore.exceptions import ClientError

        check_name(name)
        for prefix in self.prefixes:
            uri = f"{prefix}{name}/"
            bucket, key = self.split(uri)
            try:
                self.client.head_object(Bucket=bucket, Key=key + CONFIG_FILE)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    continue
                raise SourceError(f"S3 lookup of {uri} failed: {e}", param="source") from e
            return uri
        return None

    def call(self, uri: str, fn: Callable, *args: Any) -> Any:
        """``fn(*args)``; a failed S3 request becomes a ``SourceError`` saying what to check."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args)
        except (BotoCoreError, ClientError) as e:
            raise SourceError(
                f"S3 request for {uri} failed: {e}. Check the credentials in the environment "
                f"(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), that the bucket exists, and {self.configured_at}",
                param="source",
            ) from e


class SourceSet:
    """The configured sources; routes a URI to the one that accepts it."""

    def __init__(self, settings: Iterable[SourceSettings], extra: Iterable[AdapterSource] = ()) -> None:
        self.sources: list[AdapterSource] = [_SOURCE_TYPES[s.type](s) for s in settings] + list(extra)

    def for_uri(self, uri: str) -> AdapterSource:
        scheme = urlparse(uri).scheme or "file"
        candidates = [s for s in self.sources if s.scheme == scheme]
        if not candidates:
            schemes = sorted({s.scheme for s in self.sources})
            raise SourceError(
                f"no source is configured for {uri!r} (scheme {scheme!r}); configured schemes: "
                f"{', '.join(schemes) or 'none'}. Add one under store.sources",
                param="source",
            )
        for source in candidates:
            if source.allows(uri):
                return source
        # Let the first candidate explain why (outside roots, '..', ...).
        return candidates[0]

    def fetch(self, uri: str, dest: Path, *, max_bytes: int) -> None:
        self.for_uri(uri).fetch(uri, dest, max_bytes=max_bytes)

    def find(self, name: str) -> str | None:
        """The first source (in config order) that has an adapter called ``name``."""
        for source in self.sources:
            uri = source.find(name)
            if uri is not None:
                logger.info("found adapter %s at %s", name, uri)
                return uri
        return None
