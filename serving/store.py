"""The adapter store as serving sets it up: settings → an open ``AdapterStore`` with the configured adapters.

Adapters listed under ``adapters:`` in the config are registered (validated
against the base model first) at start-up; their directories become the roots
of a local source, so the store reads nothing else from disk unless
``store.sources`` says so. Without a ``store:`` section the store lives in a
temporary directory for the life of the process.
"""

from __future__ import annotations

import logging
from pathlib import Path

from adapter_store import AdapterStore, BaseModelSpec, LocalSourceSettings, OwnershipConflict, StoreSettings
from serving.adapter_rules import engine_lora_check
from serving.config import ConfigError, Settings

logger = logging.getLogger(__name__)


def store_settings(settings: Settings, default_root: Path) -> StoreSettings:
    """The store's settings with the config's adapter directories added as a local source."""
    base = settings.store or StoreSettings(root=default_root)
    if not settings.adapters:
        return base
    configured = LocalSourceSettings(type="local", roots=[a.path for a in settings.adapters])
    return StoreSettings.model_validate({**base.model_dump(), "sources": [*base.sources, configured]})


def open_store(settings: Settings, default_root: Path) -> AdapterStore:
    """Open the store and register every configured adapter (a no-op for files already registered).

    A configured adapter registers for its configured ``tenant``; a persistent
    registry in which that name already belongs to someone else refuses to
    start rather than serve it to the wrong keys.
    """
    resolved = store_settings(settings, default_root)
    base = BaseModelSpec.from_config(
        settings.model.path / "config.json", [settings.model.name, *resolved.compatible_bases]
    )
    store = AdapterStore.open(
        resolved,
        base=base,
        max_lora_rank=settings.engine.max_lora_rank,
        # vLLM's own adapter_config.json rules: what its loader would refuse is refused at registration.
        loader_check=engine_lora_check(settings.engine.max_lora_rank),
        configured_owners={a.name: a.tenant for a in settings.adapters},  # schema 1 kept these in the config only
    )
    try:
        for adapter in settings.adapters:
            try:
                version = store.register(str(adapter.path), adapter.name, tenant=adapter.tenant)
            except OwnershipConflict as e:
                raise ConfigError(
                    f"adapters[{adapter.name!r}].tenant does not match the store at {resolved.root}: {e.message}. "
                    "Fix the tenant in the config, or delete the adapter's versions from the store "
                    "(loraserve adapters delete NAME@VERSION) if its owner really changes"
                ) from e
            logger.info("adapter %s is version %s", adapter.name, version.version[:16])
        store.pin_configured()
    except BaseException:
        store.close()
        raise
    return store
