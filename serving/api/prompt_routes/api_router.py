"""Routes of /admin/routes: admin role required; changes also need routing.admin_enabled."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Path, Request, Response

from routing import RouteSpec
from routing.config import TARGET_PATTERN
from serving.api.auth import AdminDep
from serving.api.errors import ErrorResponse
from serving.api.prompt_routes.protocol import RouteCard, RouteDeleted, RouteList
from serving.api.prompt_routes.serving import PromptRoutesServing

router = APIRouter(tags=["routes"])


async def prompt_routes_serving(request: Request) -> PromptRoutesServing:
    """Built with the engine by :mod:`serving.api.app`, which holds it on ``app.state``.

    ``async``: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop per request.
    """
    return request.app.state.prompt_routes_serving


PromptRoutesServingDep = Annotated[PromptRoutesServing, Depends(prompt_routes_serving)]

RouteName = Annotated[str, Path(pattern=TARGET_PATTERN, description="Route name (defaults to its adapter).")]
_ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404)}


@router.get("/admin/routes", response_model=RouteList, responses=_ERRORS)
async def list_routes(serving: PromptRoutesServingDep, _: AdminDep) -> RouteList:
    return serving.list_routes()


@router.put("/admin/routes/{name}", response_model=RouteCard, responses=_ERRORS)
async def put_route(
    name: RouteName, spec: RouteSpec, response: Response, serving: PromptRoutesServingDep, _: AdminDep
) -> RouteCard:
    """Add the route (201) or replace it (200); effective for the next request."""
    card, created = await serving.put_route(name, spec)
    response.status_code = 201 if created else 200
    return card


@router.delete("/admin/routes/{name}", response_model=RouteDeleted, responses=_ERRORS)
async def delete_route(name: RouteName, serving: PromptRoutesServingDep, _: AdminDep) -> RouteDeleted:
    return await serving.delete_route(name)


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
