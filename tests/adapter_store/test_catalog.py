"""Content-addressed adapter versions."""

from __future__ import annotations

from pathlib import Path

from adapter_store import AdapterCatalog, content_digest


def make_adapter(root: Path, weights: bytes) -> Path:
    root.mkdir(parents=True)
    (root / "adapter_config.json").write_text('{"r": 8}')
    (root / "adapter_model.safetensors").write_bytes(weights)
    return root


def test_digest_depends_on_bytes_and_names(tmp_path: Path) -> None:
    a = make_adapter(tmp_path / "a", b"weights-1")
    b = make_adapter(tmp_path / "b", b"weights-1")
    c = make_adapter(tmp_path / "c", b"weights-2")
    assert content_digest(a) == content_digest(b)
    assert content_digest(a) != content_digest(c)
    (b / "adapter_model.safetensors").rename(b / "renamed.safetensors")
    assert content_digest(a) != content_digest(b)


def test_catalog_pins_versions(tmp_path: Path) -> None:
    a = make_adapter(tmp_path / "a", b"one")
    catalog = AdapterCatalog([("code", a)])
    served = catalog.get("code")
    assert served is not None and served.path == a and len(served.version) == 16
    assert catalog.get("legal") is None
    assert [s.name for s in catalog] == ["code"]
