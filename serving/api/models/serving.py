"""Serving class of /v1/models: the base model, then every adapter on top of it."""

from __future__ import annotations

import asyncio
import time

from adapter_store import AdapterCatalog, AdapterVersion
from serving.api.auth import Principal
from serving.api.models.protocol import AdapterInfo, ModelCard, ModelList
from serving.api.resolver import AdapterResolver
from serving.config import Settings


def adapter_info(catalog: AdapterCatalog, version: AdapterVersion) -> AdapterInfo:
    """The version and metadata of ``version`` as the API shows it."""
    aliases = catalog.store.registry.aliases(version.name)
    meta = version.metadata
    return AdapterInfo(
        version=version.version,
        aliases=sorted(alias for alias, digest in aliases.items() if digest == version.version),
        base_model=meta.base_model,
        rank=meta.rank,
        alpha=meta.alpha,
        target_modules=list(meta.target_modules),
        size_bytes=meta.size_bytes,
        created=int(version.created_at),
        checksum=version.checksum,
        tags=version.tags,
        health=catalog.health(version).state,
    )


class ModelsServing:
    def __init__(self, settings: Settings, resolver: AdapterResolver) -> None:
        self.settings = settings
        self.resolver = resolver
        self.created = int(time.time())

    async def list_models(self, principal: Principal) -> ModelList:
        """The base model and the adapters this caller may use (public ones and its tenant's), with versions."""
        return await asyncio.to_thread(self._list, principal)

    def _list(self, principal: Principal) -> ModelList:
        base = self.settings.model
        catalog = self.resolver.catalog
        cards = [ModelCard(id=base.name, created=self.created, root=str(base.path), max_model_len=base.max_model_len)]
        cards += [
            ModelCard(
                id=version.name,
                created=int(version.created_at),
                root=version.source,
                parent=base.name,
                adapter=adapter_info(catalog, version),
            )
            for version in catalog
            if self.resolver.may_use(principal, version.name)
        ]
        return ModelList(data=cards)
