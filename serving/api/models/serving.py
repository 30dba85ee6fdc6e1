"""Serving class of /v1/models: the base model, then every adapter on top of it."""

from __future__ import annotations

import asyncio
import time

from adapter_store import AdapterStoreError
from serving.api.adapter_info import adapter_info
from serving.api.auth import Principal
from serving.api.errors import store_error
from serving.api.models.protocol import ModelCard, ModelList
from serving.api.selector import AdapterSelector
from serving.config import Settings


class ModelsServing:
    def __init__(self, settings: Settings, selector: AdapterSelector) -> None:
        self.settings = settings
        self.selector = selector
        self.created = int(time.time())

    async def list_models(self, principal: Principal) -> ModelList:
        """The base model and the adapters this caller may use (public ones and its tenant's), with versions.

        It lists the registry, so while the registry is unreachable it answers 503 ``registry_unavailable``."""
        try:
            return await asyncio.to_thread(self._list, principal)
        except AdapterStoreError as e:
            raise store_error(e) from e

    def _list(self, principal: Principal) -> ModelList:
        base = self.settings.model
        store = self.selector.store
        cards = [ModelCard(id=base.name, created=self.created, root=str(base.path), max_model_len=base.max_model_len)]
        cards += [
            ModelCard(
                id=version.name,
                created=int(version.created_at),
                root=version.source,
                parent=base.name,
                adapter=adapter_info(store, version),
            )
            for version in store.latest()
            if self.selector.may_use(principal, version.name)
        ]
        return ModelList(data=cards)
