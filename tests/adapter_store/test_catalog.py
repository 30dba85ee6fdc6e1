"""The catalog serving resolves model names with: refs to versions with local files."""

from __future__ import annotations

from pathlib import Path

from adapter_store import AdapterCatalog, AdapterStore, BaseModelSpec, StoreSettings, content_digest
from tests.adapter_store.helpers import BASE_NAME, write_adapter, write_base_config


def test_digest_depends_on_bytes_and_names(tmp_path: Path) -> None:
    a = write_adapter(tmp_path / "a", seed=1)
    b = write_adapter(tmp_path / "b", seed=1)
    c = write_adapter(tmp_path / "c", seed=2)
    assert content_digest(a) == content_digest(b)
    assert content_digest(a) != content_digest(c)
    (b / "adapter_model.safetensors").rename(b / "renamed.safetensors")
    assert content_digest(a) != content_digest(b)


def test_catalog_resolves_refs_to_versions(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    settings = StoreSettings.model_validate(
        {"root": tmp_path / "store", "sources": [{"type": "local", "roots": [volume]}]}
    )
    spec = BaseModelSpec.from_config(write_base_config(tmp_path / "base"), [BASE_NAME])
    store = AdapterStore.open(settings, base=spec, max_lora_rank=16)
    v1 = store.register(str(write_adapter(volume / "code", seed=1)), "code", aliases=("stable",))
    v2 = store.register(str(write_adapter(volume / "code", seed=2)), "code")
    store.register(str(write_adapter(volume / "legal", seed=3)), "legal", tenant="lawfirm")
    store.register(str(write_adapter(volume / "medical", seed=4)), "medical", tenant="hospital")
    catalog = AdapterCatalog(store)

    for ref, expected in [("code", v2), ("code@stable", v1), (f"code@{v1.version[:10]}", v1)]:
        version = catalog.find(ref)
        assert version == expected
        served = catalog.acquire(version)
        assert (served.name, served.version) == ("code", expected.version)
        assert content_digest(served.path) == expected.version and store.cache.in_use(expected.version)
        assert served.source == str(volume / "code")
        catalog.release(served)
        assert not store.cache.in_use(expected.version)
    for missing in ("nothing", "code@canary", "code@" + "0" * 8, "not a name", "base"):
        assert catalog.find(missing) is None
    # Owners are the names' registered tenants; unknown names are public (and never registered by a lookup).
    assert [catalog.owner(n) for n in ("code", "legal", "medical", "nothing")] == [None, "lawfirm", "hospital", None]
    assert [(v.name, v.version) for v in catalog][0] == ("code", v2.version)
    assert len(catalog) == 3
    store.close()
