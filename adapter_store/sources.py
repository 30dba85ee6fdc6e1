"""Where adapter files come from: one :class:`AdapterSource` subclass per backend.

A source copies an adapter's files into a directory the store owns (a staging
directory, later renamed into the cache), so what is validated and hashed is a
private copy nobody else can change. Sources are confined: a local source reads
only under its configured roots (after resolving symlinks), an S3 source only
under its configured URL prefixes. Backends are chosen from a registry keyed on
the settings' ``type``, and URIs are routed to the source that accepts them.

The files themselves are untrusted, even from a configured source, and the copy
runs before validation, so the copy itself must be safe:

* every file lands inside the destination: a name is built from its parts, and
  an absolute, empty, ``.`` or ``..`` part (an S3 key ``adapters/x//etc/y``)
  is refused, as are layouts deeper than an adapter needs;
* the bytes actually copied are capped while copying, over all files together
  (``max_bytes``): a listed or ``stat`` size can change before the read;
* a local file is opened without following links, relative to its directory's
  descriptor, and the descriptor is checked before a byte is read: a symlink,
  FIFO, device or socket (swapped in after any earlier check), or a hard link
  (a second name for a file that may lie outside the roots) is refused. The
  adapter directory itself may be reached through a symlink that resolves
  inside a root; nothing inside it may be a link.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar
from urllib.parse import unquote, urlparse

from adapter_store.errors import InvalidAdapter, SourceError
from adapter_store.refs import check_name
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


_SOURCE_TYPES: dict[str, type[AdapterSource]] = {}


def register_source_type(settings_type: str) -> Callable[[type[AdapterSource]], type[AdapterSource]]:
    """Class decorator: the backend for settings with ``type: <settings_type>``."""

    def add(cls: type[AdapterSource]) -> type[AdapterSource]:
        _SOURCE_TYPES[settings_type] = cls
        return cls

    return add


MAX_FILES = 64
"""Most files one adapter may hold (PEFT writes two, plus a README or tokenizer files)."""
MAX_DEPTH = 3
"""Most path parts of one file name: PEFT's layout is flat; a little nesting is tolerated."""
MAX_NAME_BYTES = 255
_CHUNK = 1 << 20


def _too_large(uri: str, size: int, max_bytes: int) -> InvalidAdapter:
    return InvalidAdapter(
        f"adapter at {uri} takes {size} bytes, more than the limit of {max_bytes} bytes (store.max_adapter_bytes); "
        "lower its rank or raise the limit",
        reason="too_large",
    )


def _too_many_files(uri: str) -> InvalidAdapter:
    return InvalidAdapter(
        f"adapter at {uri} holds more than {MAX_FILES} files; an adapter needs {CONFIG_FILE}, its safetensors "
        "weights and perhaps a README. Remove the other files",
        reason="too_many_files",
    )


def safe_parts(name: str, uri: str) -> tuple[str, ...]:
    """The parts of a relative file name (``/``-separated); ``SourceError`` unless each is a plain name.

    Splitting by hand, not with ``PurePosixPath``: that collapses ``a//b`` and
    makes ``/etc/x`` absolute, which is exactly what must be refused.
    """
    parts = tuple(name.split("/"))
    if (
        not name
        or len(parts) > MAX_DEPTH
        or any(part in ("", ".", "..") or "\0" in part or len(part.encode()) > MAX_NAME_BYTES for part in parts)
    ):
        raise SourceError(
            f"file {name!r} of {uri} has an unsafe name (an empty, '.' or '..' part, a part over "
            f"{MAX_NAME_BYTES} bytes, or more than {MAX_DEPTH} levels); an adapter holds plain file names such as "
            f"{CONFIG_FILE}",
            param="source",
        )
    return parts


def _target(dest: Path, parts: tuple[str, ...], uri: str) -> Path:
    """``dest/<parts>``, its parent directories created; ``SourceError`` if it would lie outside ``dest``."""
    target = dest.joinpath(*parts)
    if not target.resolve().is_relative_to(dest.resolve()):
        raise SourceError(f"file {'/'.join(parts)!r} of {uri} would be written outside the adapter", param="source")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file and a directory of the same name ("a" and "a/b")
        raise SourceError(f"file {'/'.join(parts)!r} of {uri} clashes with another file: {e}", param="source") from e
    return target


@contextmanager
def _emptied_on_failure(dest: Path) -> Iterator[None]:
    """A refused fetch leaves ``dest`` as it found it: empty."""
    try:
        yield
    except BaseException:
        for child in dest.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        raise


class ByteBudget:
    """A running cap on what one fetch copies: bytes over all files, and the number of files."""

    def __init__(self, uri: str, max_bytes: int) -> None:
        self.uri = uri
        self.max_bytes = max_bytes
        self.used = 0
        self.files = 0

    def add_file(self) -> None:
        self.files += 1
        if self.files > MAX_FILES:
            raise _too_many_files(self.uri)

    def take(self, size: int) -> None:
        self.used += size
        if self.used > self.max_bytes:
            raise _too_large(self.uri, self.used, self.max_bytes)


def copy_capped(read: Callable[[int], bytes], target: Path, budget: ByteBudget) -> None:
    """Write what ``read`` returns into the new file ``target`` until it returns ``b""``, within ``budget``.

    Each chunk is counted before it is written, so at most one chunk past the
    limit is ever read and none of it is kept.
    """
    budget.add_file()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(target, flags, 0o644)
    except OSError as e:
        raise SourceError(f"cannot create {target.name} for {budget.uri}: {e}", param="source") from e
    with os.fdopen(fd, "wb") as out:
        while chunk := read(_CHUNK):
            budget.take(len(chunk))
            out.write(chunk)


_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # O_NONBLOCK: a FIFO cannot hang open


def copy_directory(directory: Path, dest: Path, budget: ByteBudget) -> None:
    """Copy the regular files under ``directory`` into ``dest``, every one opened without following links.

    ``directory`` is opened once; everything under it is opened relative to
    its descriptor, so swapping a path for a link after a check changes
    nothing: the descriptor that was checked is the one read.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise SourceError(f"cannot open {budget.uri} as a directory: {e}", param="source") from e
    try:
        with _emptied_on_failure(dest):
            _copy_entries(fd, (), dest, budget)
    finally:
        os.close(fd)


def _copy_entries(dir_fd: int, prefix: tuple[str, ...], dest: Path, budget: ByteBudget) -> None:
    with os.scandir(dir_fd) as scan:
        names = sorted(entry.name for entry in scan)
    for name in names:
        parts = safe_parts("/".join((*prefix, name)), budget.uri)
        label = f"{budget.uri} ({'/'.join(parts)})"
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
        except OSError as e:  # ELOOP: a symlink; ENXIO: a socket
            raise SourceError(
                f"{label} cannot be read as a plain file or directory ({e.strerror}); adapters hold plain files, "
                "not symbolic links, sockets or devices: copy the real file in",
                param="source",
            ) from e
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                _copy_entries(fd, parts, dest, budget)
                continue
            if not stat.S_ISREG(info.st_mode):
                raise SourceError(
                    f"{label} is not a regular file (a FIFO or device); adapters hold plain files", param="source"
                )
            if info.st_nlink != 1:
                raise SourceError(
                    f"{label} has {info.st_nlink} hard links; a hard link can name a file outside the roots, so "
                    "adapter files must have exactly one name. Copy the file instead of linking it",
                    param="source",
                )
            copy_capped(lambda n, fd=fd: os.read(fd, n), _target(dest, parts, budget.uri), budget)
        finally:
            os.close(fd)


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
            raise SourceError(f"{uri!r} contains '..'; give the adapter's path inside a configured root", param="source")
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

    def __init__(self, settings: S3SourceSettings) -> None:
        self.settings = settings
        self.prefixes = list(settings.url_prefixes)
        self._client: Any = None

    def describe(self) -> str:
        return "S3 prefixes " + ", ".join(self.prefixes)

    @property
    def client(self) -> Any:
        """A boto3 client; credentials come from the environment (or instance role), never from config."""
        if self._client is None:
            import boto3

            self._client = boto3.client(
                "s3", endpoint_url=self.settings.endpoint_url, region_name=self.settings.region
            )
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
        bucket, key = self.split(uri)
        objects = self._list(bucket, key, uri)
        if not objects:
            raise SourceError(f"no objects under {uri}; check the bucket and prefix", param="source")
        listed = sum(obj["Size"] for obj in objects)
        if listed > max_bytes:  # refused before any download; the running cap below is what holds
            raise _too_large(uri, listed, max_bytes)
        budget = ByteBudget(uri, max_bytes)
        names = [(obj["Key"], safe_parts(obj["Key"][len(key) :], uri)) for obj in objects]  # all, before any write
        with _emptied_on_failure(dest):
            for object_key, parts in names:
                target = _target(dest, parts, uri)
                body = self._call(uri, lambda k=object_key: self.client.get_object(Bucket=bucket, Key=k))["Body"]
                try:
                    self._call(uri, copy_capped, body.read, target, budget)
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
                    raise _too_many_files(uri)
            return objects

        return self._call(uri, first_objects)

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

    @staticmethod
    def _call(uri: str, fn: Callable, *args: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args)
        except (BotoCoreError, ClientError) as e:
            raise SourceError(
                f"S3 request for {uri} failed: {e}. Check the credentials in the environment "
                "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and the source's endpoint_url",
                param="source",
            ) from e


class UploadSource(AdapterSource):
    """Adapters uploaded through the admin API, kept under the store root as ``upload:<sha256>``.

    An uploaded version has no other source to be fetched from again after the
    disk cache evicts it, so its files are kept here (outside the cache budget)
    until the version is deleted. It is never searched by name.
    """

    scheme = "upload"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return f"uploads under {self.directory}"

    def uri(self, digest: str) -> str:
        return f"{self.scheme}:{digest}"

    def path_of(self, uri: str) -> Path:
        digest = uri.removeprefix(f"{self.scheme}:")
        if len(digest) != 64 or not set(digest) <= set("0123456789abcdef"):
            raise SourceError(f"{uri!r} is not an upload (upload:<sha256>)", param="source")
        return self.directory / digest

    def allows(self, uri: str) -> bool:
        return urlparse(uri).scheme == self.scheme

    def keep(self, staging: Path, digest: str) -> tuple[str, bool]:
        """Copy a validated upload here (atomically); its URI, and whether it was new."""
        target = self.path_of(self.uri(digest))
        if target.exists():
            return self.uri(digest), False
        partial = self.directory / f".partial-{digest}"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(staging, partial)
        partial.rename(target)
        return self.uri(digest), True

    def discard(self, uri: str) -> None:
        shutil.rmtree(self.path_of(uri), ignore_errors=True)

    def fetch(self, uri: str, dest: Path, *, max_bytes: int) -> None:
        directory = self.path_of(uri)
        if not directory.is_dir():
            raise SourceError(f"upload {uri} is gone from {self.directory}; upload the adapter again", param="source")
        copy_directory(directory, dest, ByteBudget(uri, max_bytes))

    def find(self, name: str) -> str | None:
        return None


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
