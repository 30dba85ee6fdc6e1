"""Copying untrusted adapter files into a private directory: confined names, capped bytes, no links.

A source's copy runs before validation, so the copy itself must be safe:

* every file lands inside the destination: a name is built from its parts, and
  an absolute, empty, ``.`` or ``..`` part (an S3 key ``adapters/x//etc/y``)
  is refused, as are layouts deeper than an adapter needs;
* the bytes actually copied are capped while copying, over all files together:
  a listed or ``stat`` size can change before the read;
* a local file is opened without following links, relative to its directory's
  descriptor, and the descriptor is checked before a byte is read: a symlink,
  FIFO, device or socket (swapped in after any earlier check), or a hard link
  (a second name for a file that may lie outside the roots) is refused, and a
  FIFO cannot block the open.

A refused copy leaves the destination empty.
"""

from __future__ import annotations

import functools
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from adapter_store.errors import InvalidAdapter, SourceError

CONFIG_FILE = "adapter_config.json"

MAX_FILES = 64
"""Most files one adapter may hold (PEFT writes two, plus a README or tokenizer files)."""
MAX_DEPTH = 3
"""Most path parts of one file name: PEFT's layout is flat; a little nesting is tolerated."""
MAX_NAME_BYTES = 255
_CHUNK = 1 << 20


def too_large(uri: str, size: int, max_bytes: int) -> InvalidAdapter:
    return InvalidAdapter(
        f"adapter at {uri} takes {size} bytes, more than the limit of {max_bytes} bytes (store.max_adapter_bytes); "
        "lower its rank or raise the limit",
        reason="too_large",
    )


def too_many_files(uri: str) -> InvalidAdapter:
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


def writable_target(dest: Path, parts: tuple[str, ...], uri: str) -> Path:
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
def emptied_on_failure(dest: Path) -> Iterator[None]:
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
            raise too_many_files(self.uri)

    def take(self, size: int) -> None:
        self.used += size
        if self.used > self.max_bytes:
            raise too_large(self.uri, self.used, self.max_bytes)


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
        with emptied_on_failure(dest):
            _copy_entries(fd, (), dest, budget)
    finally:
        os.close(fd)


def _copy_entries(dir_fd: int, prefix: tuple[str, ...], dest: Path, budget: ByteBudget) -> None:
    names = []
    with os.scandir(dir_fd) as scan:
        for entry in scan:
            names.append(entry.name)
            if len(names) > MAX_FILES:
                raise too_many_files(budget.uri)
    names.sort()
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
            copy_capped(functools.partial(os.read, fd), writable_target(dest, parts, budget.uri), budget)
        finally:
            os.close(fd)
