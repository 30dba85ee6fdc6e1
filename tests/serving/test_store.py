"""Serving's set-up of the adapter store: configured adapters are validated and registered at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from adapter_store import InvalidAdapter
from adapter_store.migration import legacy_digest
from serving.config import ConfigError, load_settings
from serving.store import open_store
from tests.adapter_store.helpers import BASE_NAME, write_adapter, write_base_config, write_v1_registry


def write_config(tmp_path: Path, store: dict | None, adapters: list[dict]) -> Path:
    write_base_config(tmp_path / "base")
    raw = {"model": {"path": "base", "name": BASE_NAME}, "auth": {"mode": "open"}, "adapters": adapters}
    if store is not None:
        raw["store"] = store
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_configured_adapters_are_registered_and_survive_restart(tmp_path: Path) -> None:
    write_adapter(tmp_path / "adapters" / "code", seed=1)
    write_adapter(tmp_path / "volume" / "legal", seed=2)
    store_section = {"root": "store", "sources": [{"type": "local", "roots": ["volume"]}], "pinned": ["code"]}
    settings = load_settings(write_config(tmp_path, store_section, [{"name": "code", "path": "adapters/code"}]))
    assert settings.store is not None and settings.store.root == tmp_path / "store"  # relative to the file
    assert settings.store.sources[0].roots == [tmp_path / "volume"]
    store = open_store(settings, tmp_path / "unused")
    code = store.version("code")
    assert code.pinned and code.source == str(tmp_path / "adapters" / "code")
    store.register(str(tmp_path / "volume" / "legal"), "legal")
    store.close()
    again = open_store(settings, tmp_path / "unused")
    assert again.names() == ["code", "legal"] and again.version("code") == code
    again.close()
    assert not (tmp_path / "unused").exists()


def test_invalid_configured_adapter_fails_start_up(tmp_path: Path) -> None:
    write_adapter(tmp_path / "adapters" / "big", rank=64)
    settings = load_settings(write_config(tmp_path, None, [{"name": "big", "path": "adapters/big"}]))
    with pytest.raises(InvalidAdapter, match="rank 64 is greater than max_lora_rank 16"):
        open_store(settings, tmp_path / "scratch")


def test_configured_tenant_owns_the_name_and_a_conflicting_registry_refuses_start_up(tmp_path: Path) -> None:
    write_adapter(tmp_path / "adapters" / "medical", seed=1)
    store_section = {"root": "store"}
    entry = {"name": "medical", "path": "adapters/medical", "tenant": "hospital"}
    store = open_store(load_settings(write_config(tmp_path, store_section, [entry])), tmp_path / "unused")
    assert store.tenant("medical") == "hospital"
    store.close()
    moved = load_settings(write_config(tmp_path, store_section, [entry | {"tenant": "lawfirm"}]))
    with pytest.raises(ConfigError, match=r"adapters\['medical'\].tenant does not match the store .*tenant 'hospital'"):
        open_store(moved, tmp_path / "unused")
    public = load_settings(write_config(tmp_path, store_section, [{"name": "medical", "path": "adapters/medical"}]))
    with pytest.raises(ConfigError, match="for no tenant"):
        open_store(public, tmp_path / "unused")


def test_an_old_registry_keeps_the_configured_owner_of_its_adapters(tmp_path: Path) -> None:
    """A schema-1 store never recorded configured adapters' tenants (the config did): upgrading keeps them."""
    files = write_adapter(tmp_path / "adapters" / "medical", seed=1)
    write_v1_registry(tmp_path / "store", [("medical", legacy_digest(files), str(files), {})])
    entry = {"name": "medical", "path": "adapters/medical", "tenant": "hospital"}
    store = open_store(load_settings(write_config(tmp_path, {"root": "store"}, [entry])), tmp_path / "unused")
    assert store.tenant("medical") == "hospital" and len(store.versions("medical")) == 1
    assert not store.version("medical").legacy_digest
    store.close()
