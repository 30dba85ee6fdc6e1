"""Content addresses: a version is the sha256 of a manifest of an adapter directory's files.

The digest is a version's identity: the registry keys versions on it, the disk
cache checks fetched files against it, and the engine keys its integer LoRA ids
on it (vLLM's prefix cache then never serves one version's KV blocks to
another). So two different file sets must never share one. Hashing names and
bytes run together (``name\\0bytes\\0``) did not ensure that: bytes could move
from the end of one file into the name and start of the next and give the same
hash. Every field of the manifest is therefore length-prefixed.

Format (version 2), exactly::

    digest   = sha256( b"loraserve-adapter-digest-v2\\n" || u64(count) || entry_1 || ... || entry_count )
    entry_i  = u64(len(name)) || name || u64(size) || sha256(file bytes)   (the raw 32-byte digest)

``u64`` is an unsigned 64-bit big-endian integer; ``name`` is the file's path
relative to the directory, ``/``-separated, UTF-8; entries are sorted by
``name`` (as bytes); ``count`` is the number of entries. Only regular files
count (links are never followed; validation refuses them). The same files give
the same digest on every machine.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG

_CHUNK = 1 << 20
DIGEST_TAG = b"loraserve-adapter-digest-v2\n"


@dataclass(frozen=True)
class ManifestEntry:
    """One file of an adapter: its relative POSIX name, size and sha256 (hex)."""

    name: str
    size: int
    sha256: str


def adapter_files(directory: Path) -> list[Path]:
    """Every regular file under ``directory`` (links not followed), in the order the digest uses."""
    files = []
    for parent, _, names in os.walk(directory):
        for name in names:
            path = Path(parent, name)
            if S_ISREG(path.lstat().st_mode):
                files.append(path)
    return sorted(files, key=lambda p: p.relative_to(directory).as_posix().encode())


def file_manifest(directory: Path) -> list[ManifestEntry]:
    """The manifest the digest is taken over: one entry per regular file, sorted by name."""
    entries = []
    for file in adapter_files(directory):
        digest, size = hashlib.sha256(), 0
        with file.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        entries.append(ManifestEntry(file.relative_to(directory).as_posix(), size, digest.hexdigest()))
    return entries


def manifest_digest(entries: list[ManifestEntry]) -> str:
    """sha256 of the length-prefixed encoding of ``entries`` (the module docstring gives the format)."""
    digest = hashlib.sha256(DIGEST_TAG + struct.pack(">Q", len(entries)))
    for entry in sorted(entries, key=lambda e: e.name.encode()):
        name = entry.name.encode()
        digest.update(struct.pack(">Q", len(name)) + name + struct.pack(">Q", entry.size) + bytes.fromhex(entry.sha256))
    return digest.hexdigest()


def content_digest(directory: Path) -> str:
    """The version digest of the files under ``directory`` (format in the module docstring)."""
    return manifest_digest(file_manifest(directory))


def directory_size(directory: Path) -> int:
    """Bytes of the regular files under ``directory`` (what the disk budget counts).

    Safe to call while files are being removed: a file that vanishes mid-walk counts as 0.
    """
    total = 0
    for parent, _, names in os.walk(directory):
        for name in names:
            try:
                stat = os.lstat(os.path.join(parent, name))
            except FileNotFoundError:
                continue
            if S_ISREG(stat.st_mode):
                total += stat.st_size
    return total
