"""Content digests: the documented, length-prefixed manifest format, and no collisions by moving bytes."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from adapter_store.digest import ManifestEntry, content_digest, file_manifest, manifest_digest
from tests.adapter_store.helpers import write_adapter


def _write(directory: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return directory


def _old_digest(directory: Path) -> str:
    """The previous scheme: sha256 over name\\0bytes\\0 of each file, in name order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def test_moving_bytes_between_files_changes_the_digest(tmp_path: Path) -> None:
    one = _write(tmp_path / "one", {"a": b"x\0b\0y"})
    two = _write(tmp_path / "two", {"a": b"x", "b": b"y"})
    assert _old_digest(one) == _old_digest(two)  # the ambiguity: both hash "a\0x\0b\0y\0"
    assert content_digest(one) != content_digest(two)


def test_a_name_cannot_absorb_bytes_either(tmp_path: Path) -> None:
    one = _write(tmp_path / "one", {"adapter_config.json": b"{}\0adapter_model.bin\0PICKLE"})
    two = _write(tmp_path / "two", {"adapter_config.json": b"{}", "adapter_model.bin": b"PICKLE"})
    assert _old_digest(one) == _old_digest(two)
    assert content_digest(one) != content_digest(two)


def test_the_digest_is_the_documented_format(tmp_path: Path) -> None:
    directory = _write(tmp_path / "d", {"b.json": b"{}", "a/w.safetensors": b"\1\2\3", "z.md": b""})
    expected = hashlib.sha256(b"loraserve-adapter-digest-v2\n" + struct.pack(">Q", 3))
    for name, data in sorted({"a/w.safetensors": b"\1\2\3", "b.json": b"{}", "z.md": b""}.items()):
        encoded = name.encode()
        expected.update(struct.pack(">Q", len(encoded)) + encoded + struct.pack(">Q", len(data)))
        expected.update(hashlib.sha256(data).digest())
    assert content_digest(directory) == expected.hexdigest()
    assert file_manifest(directory) == [
        ManifestEntry("a/w.safetensors", 3, hashlib.sha256(b"\1\2\3").hexdigest()),
        ManifestEntry("b.json", 2, hashlib.sha256(b"{}").hexdigest()),
        ManifestEntry("z.md", 0, hashlib.sha256(b"").hexdigest()),
    ]
    assert manifest_digest(list(reversed(file_manifest(directory)))) == content_digest(directory)


def test_symlinks_are_not_followed(tmp_path: Path) -> None:
    directory = _write(tmp_path / "d", {"a": b"1"})
    before = content_digest(directory)
    (directory / "link").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").write_bytes(b"secret")
    assert content_digest(directory) == before


def test_digest_depends_on_bytes_and_names(tmp_path: Path) -> None:
    a = write_adapter(tmp_path / "a", seed=1)
    b = write_adapter(tmp_path / "b", seed=1)
    c = write_adapter(tmp_path / "c", seed=2)
    assert content_digest(a) == content_digest(b)
    assert content_digest(a) != content_digest(c)
    (b / "adapter_model.safetensors").rename(b / "renamed.safetensors")
    assert content_digest(a) != content_digest(b)
