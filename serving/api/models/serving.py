"""Serving class of /v1/models: the base model, then every adapter on top of it."""

from __future__ import annotations

import time

from adapter_store import AdapterCatalog
from serving.api.auth import Principal
from serving.api.models.protocol import ModelCard, ModelList
from serving.config import Settings


class ModelsServing:
    def __init__(self, settings: Settings, catalog: AdapterCatalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self.created = int(time.time())

    def list_models(self, principal: Principal) -> ModelList:
        """The base model and the adapters this caller may use (public ones and its tenant's)."""
        owners = {a.name: a.tenant for a in self.settings.adapters}
        base = self.settings.model
        cards = [ModelCard(id=base.name, created=self.created, root=str(base.path), max_model_len=base.max_model_len)]
        cards += [
            ModelCard(id=adapter.name, created=self.created, root=adapter.source, parent=base.name)
            for adapter in self.catalog
            if principal.may_use(owners.get(adapter.name))
        ]
        return ModelList(data=cards)
