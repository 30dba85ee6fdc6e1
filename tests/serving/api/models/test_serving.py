"""``ModelsServing``: /v1/models from the store's catalog: who sees what, what each card says, and that a listing
is served from memory until the registry changes. A real ``AdapterStore`` (real files, real SQLite), no engine;
the same route through a real server is in tests/e2e/test_security_tenants.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from adapter_store import AdapterStore, RegistryUnavailable
from adapter_store.changes import SqliteChanges
from serving.api.auth import OPEN_PRINCIPAL, Principal
from serving.api.errors import RegistryUnavailableError, install_error_handlers
from serving.api.models.api_router import attach_router
from serving.api.models.protocol import ModelList
from serving.api.models.serving import ModelsServing
from serving.config import Settings, load_settings
from serving.store import open_store
from tests.adapter_store.helpers import BASE_NAME, write_adapter
from tests.serving.test_store import write_config

OWNERS = {"public": None, "medical": "hospital", "legal": "lawfirm"}
ADMIN = Principal(key_id="ops", tenant=None, role="admin")
HOSPITAL = Principal(key_id="h", tenant="hospital", role="user")
NOBODY = Principal(key_id="n", tenant=None, role="user")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ModelsServing, AdapterStore, Path]]:
    volume = tmp_path / "volume"
    settings: Settings = load_settings(
        write_config(tmp_path, {"root": "store", "sources": [{"type": "local", "roots": ["volume"]}]}, [])
    )
    store = open_store(settings, tmp_path / "unused")
    for i, (name, owner) in enumerate(OWNERS.items()):
        aliases = ("stable",) if name == "medical" else ()
        store.register(str(write_adapter(volume / name, seed=i + 1)), name, tenant=owner, aliases=aliases)
    yield ModelsServing(settings, store), store, volume
    store.close()


def listed(serving: ModelsServing, caller: Principal) -> ModelList:
    return ModelList.model_validate_json(asyncio.run(serving.list_models(caller)))


@pytest.mark.parametrize(
    ("caller", "visible"),
    [
        (ADMIN, ["legal", "medical", "public"]),
        (HOSPITAL, ["medical", "public"]),  # never another tenant's name
        (NOBODY, ["public"]),
        (OPEN_PRINCIPAL, ["legal", "medical", "public"]),  # open mode: everyone is admin
    ],
)
def test_each_caller_sees_the_base_and_exactly_the_adapters_it_may_use(served, caller, visible) -> None:
    serving, _, _ = served
    body = listed(serving, caller)
    assert body.object == "list"
    assert [card.id for card in body.data] == [BASE_NAME, *visible]


def test_a_card_shows_what_the_bare_name_serves(served) -> None:
    serving, store, volume = served
    old = store.version("medical")
    new = store.register(str(write_adapter(volume / "medical", seed=9)), "medical", tenant="hospital")
    store.record_health("medical", new.version, "failed", reason="bad tokens")
    card = next(c for c in listed(serving, HOSPITAL).data if c.id == "medical")
    assert card.parent == BASE_NAME and card.root == new.source and card.created == int(new.created_at)
    assert card.adapter is not None
    assert (card.adapter.version, card.adapter.aliases, card.adapter.health) == (new.version, ["latest"], "failed")
    assert card.adapter.checksum == new.checksum and old.version != new.version  # stable stays on the old one


def test_a_listing_comes_from_memory_until_the_registry_changes(served, monkeypatch: pytest.MonkeyPatch) -> None:
    serving, store, volume = served
    first = listed(serving, ADMIN)

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("/v1/models read the registry although nothing changed")

    with monkeypatch.context() as patch:
        patch.setattr("adapter_store.registry_db.Database.read", refused)
        assert listed(serving, ADMIN) == first
    public = store.version("public")
    store.record_health("public", public.version, "failed", reason="bad tokens")  # one adapter's card changes
    cards = {c.id: c for c in listed(serving, ADMIN).data}
    assert cards["public"].adapter is not None and cards["public"].adapter.health == "failed"
    store.register(str(write_adapter(volume / "fresh", seed=7)), "fresh")  # through this store
    assert "fresh" in [c.id for c in listed(serving, ADMIN).data]
    store.delete("public@latest")
    assert "public" not in [c.id for c in listed(serving, ADMIN).data]


def test_the_route_sends_the_listing_as_openai_shaped_json(served) -> None:
    """Through FastAPI (no engine): the body the serving class serialized, and the documented response model."""
    serving, _, _ = served
    app = FastAPI()
    install_error_handlers(app)
    attach_router(app)
    app.state.models_serving = serving

    @app.middleware("http")
    async def as_hospital(request: Request, call_next):  # what the auth middleware leaves for the route
        request.scope.setdefault("state", {})["principal"] = HOSPITAL
        return await call_next(request)

    response = TestClient(app).get("/v1/models")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [BASE_NAME, "medical", "public"]
    assert {m["object"] for m in body["data"]} == {"model"}
    schema = app.openapi()["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/ModelList"}


def test_a_registry_outage_answers_from_the_last_listing_with_the_same_visibility(
    served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even after a change the outage kept this replica from reading: the last listing, not a 503."""
    serving, store, volume = served
    before = {caller: listed(serving, caller) for caller in (ADMIN, HOSPITAL, NOBODY)}
    store.register(str(write_adapter(volume / "fresh", seed=7)), "fresh")  # the listing is stale now

    def down(*args: object, **kwargs: object) -> None:
        raise RegistryUnavailable("the adapter registry database cannot be reached")

    monkeypatch.setattr(SqliteChanges, "outage", 1)
    monkeypatch.setattr("adapter_store.registry_db.Database.read", down)
    assert {caller: listed(serving, caller) for caller in before} == before


def test_a_registry_outage_before_any_listing_is_a_registry_503(served, monkeypatch: pytest.MonkeyPatch) -> None:
    serving, _, _ = served
    monkeypatch.setattr(SqliteChanges, "outage", 1)
    with pytest.raises(RegistryUnavailableError):
        listed(serving, ADMIN)
