"""Serving class of /v1/models: the base model, then every adapter the caller may use, with its version.

A fleet's registry may hold thousands of adapters, and clients (the OpenAI
SDK's ``models.list()``, UIs that fill a model picker) call this often, so it
reads no registry row per adapter: it lists the store's catalog
(:meth:`AdapterStore.entries`), which is held in memory until the registry
changes and then read again in one snapshot. Visibility is decided per name
from that same snapshot's owner, exactly as a request's access check decides
it: a tenant never sees another tenant's names.

It is not paged: OpenAI's list of models has no paging, and clients expect
one list of everything they can call (``GET /v1/adapters`` is the paged,
admin-sized view). At 10,000 adapters the body is a few MB, built from
memory in a worker thread and serialized once by pydantic-core
(``loadtests.bench_registry`` times it).
"""

from __future__ import annotations

import asyncio
import time

from adapter_store import AdapterRef, AdapterStore, AdapterStoreError, CatalogEntry
from serving.api.adapter_info import entry_info
from serving.api.auth import Principal
from serving.api.errors import store_error
from serving.api.models.protocol import ModelCard, ModelList
from serving.config import Settings


class ModelsServing:
    def __init__(self, settings: Settings, store: AdapterStore) -> None:
        self.settings = settings
        self.store = store
        self.created = int(time.time())
        # name -> (the entry its card was built from, the card): a card is built again only when its entry
        # changed, so listing thousands of unchanged adapters after a re-read costs a comparison each
        self._cards: dict[str, tuple[CatalogEntry, ModelCard]] = {}

    async def list_models(self, principal: Principal) -> bytes:
        """The JSON of the :class:`ModelList` of the base model and the adapters this caller may use (public
        ones and its tenant's), with versions; built and serialized in a worker thread, since at thousands of
        adapters neither belongs on the event loop.

        While the registry is unreachable it answers from the listing as last read (kept current within about
        a second by the store): the adapters this replica still serves then. It may name an adapter deleted, or
        miss one registered, during the outage. 503 ``registry_unavailable`` only if this replica never listed."""
        try:
            return await asyncio.to_thread(lambda: self._list(principal).model_dump_json().encode())
        except AdapterStoreError as e:
            raise store_error(e) from e

    def _list(self, principal: Principal) -> ModelList:
        base = self.settings.model
        cards = [ModelCard(id=base.name, created=self.created, root=str(base.path), max_model_len=base.max_model_len)]
        entries = self.store.entries()
        cards += [self._card(entry) for entry in entries if principal.may_use(entry.owner)]
        if len(self._cards) > len(entries):  # deleted adapters' cards go
            listed = {entry.name for entry in entries}
            self._cards = {name: held for name, held in self._cards.items() if name in listed}
        return ModelList(data=cards)

    def _card(self, entry: CatalogEntry) -> ModelCard:
        held = self._cards.get(entry.name)
        if held is not None and held[0] == entry:
            return held[1]
        card = self._build_card(entry)
        self._cards[entry.name] = (entry, card)
        return card

    def _build_card(self, entry: CatalogEntry) -> ModelCard:
        version = entry.resolve(AdapterRef.parse(entry.name))  # what the bare name serves: its latest
        assert version is not None, f"{entry.name} has no latest version"  # the registry keeps one per name
        return ModelCard(
            id=entry.name,
            created=int(version.created_at),
            root=version.source,
            parent=self.settings.model.name,
            adapter=entry_info(entry, version),
        )
