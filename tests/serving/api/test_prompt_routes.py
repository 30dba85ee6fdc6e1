"""PromptRoutesServing without a server: the admin switch and the target check (stand-in encoder)."""

from __future__ import annotations

import pytest

from routing import AsyncPromptRouter, PromptRouter, RoutesFile, RouteSpec
from routing.encoders import HashingEncoder
from serving.api.errors import InvalidRequestError, ModelNotFoundError, PermissionDeniedError, RouteNotFoundError
from serving.api.prompt_routes.serving import PromptRoutesServing
from serving.config import parse_settings

SERVED = {"base", "code", "legal"}


def resolve(model: str) -> None:
    if model not in SERVED:
        raise ModelNotFoundError(model, sorted(SERVED))


def serving(routing: dict | None) -> PromptRoutesServing:
    raw = {"model": {"path": "/m", "name": "base"}, "auth": {"mode": "open"}}
    if routing is not None:
        raw["routing"] = {
            "encoder": "hashing",
            "routes": [{"adapter": "code", "utterances": ["fix my bug"]}],
            **routing,
        }
    settings = parse_settings(raw)
    prompt_router = None
    if settings.routing is not None:
        routes = RoutesFile(routes=settings.routing.routes)
        prompt_router = AsyncPromptRouter(PromptRouter(settings.routing, HashingEncoder(), routes))
    return PromptRoutesServing(settings, prompt_router, resolve)


async def test_admin_switch_off_allows_listing_but_not_changes() -> None:
    routes = serving({"admin_enabled": False})
    assert [c.name for c in routes.list_routes().data] == ["code"]
    with pytest.raises(PermissionDeniedError, match="routing.admin_enabled: true"):
        await routes.put_route("x", RouteSpec(adapter="legal", utterances=["a"]))
    with pytest.raises(PermissionDeniedError, match="routing.admin_enabled: true"):
        await routes.delete_route("code")


async def test_without_routing_everything_is_forbidden() -> None:
    routes = serving(None)
    with pytest.raises(PermissionDeniedError, match="add a `routing` section"):
        routes.list_routes()


async def test_put_checks_the_target_and_reports_created_or_replaced() -> None:
    routes = serving({"admin_enabled": True, "threshold": 0.4})
    with pytest.raises(InvalidRequestError, match="not served") as e:
        await routes.put_route("x", RouteSpec(adapter="medical", utterances=["a"]))
    assert e.value.param == "adapter"
    card, created = await routes.put_route("contracts", RouteSpec(adapter="legal", utterances=["a contract"]))
    assert created and card.threshold == 0.4 and card.adapter == "legal"
    card, created = await routes.put_route("contracts", RouteSpec(adapter="legal", utterances=["b"], threshold=0.2))
    assert not created and card.threshold == 0.2
    assert (await routes.delete_route("contracts")).deleted
    with pytest.raises(RouteNotFoundError, match="Routes: code"):
        await routes.delete_route("contracts")
