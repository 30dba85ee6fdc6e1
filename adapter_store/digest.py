"""Content addresses: a version is the sha256 over an adapter directory's files.

Names (relative, POSIX) and bytes both enter the hash, in sorted order, so the
same files always give the same digest on every machine, and two different
sets of weights can never share a version. The engine keys its integer LoRA
ids on it: vLLM's prefix cache then never serves one version's KV blocks to
another.
"""

from __future__ import annotations

import hashlib
import os
from stat import S_ISREG
from pathlib import Path

_CHUNK = 1 << 20


def adapter_files(directory: Path) -> list[Path]:
    """Every regular file under ``directory``, in the stable order the digest uses."""
    files = (p for p in directory.rglob("*") if p.is_file())
    return sorted(files, key=lambda p: p.relative_to(directory).as_posix())


def content_digest(directory: Path) -> str:
    """sha256 over the relative names and bytes of every file under ``directory``."""
    digest = hashlib.sha256()
    for file in adapter_files(directory):
        digest.update(file.relative_to(directory).as_posix().encode() + b"\0")
        with file.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


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
