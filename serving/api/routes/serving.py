"""Serving class of /admin/routes: list, add or replace, and delete routes without a restart.

Changes live in memory (the routes file is not rewritten); a route must point
at a model this server serves, checked through the same resolution as a
client's ``model``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from routing import AsyncRouter, RouteSpec
from serving.api.errors import InvalidRequestError, ModelNotFoundError, PermissionDeniedError, RouteNotFoundError
from serving.api.routes.protocol import RouteCard, RouteDeleted, RouteList
from serving.config import Settings


class RoutesServing:
    def __init__(self, settings: Settings, router: AsyncRouter | None, resolve: Callable[[str], object]) -> None:
        self.settings = settings
        self.router = router
        self.resolve = resolve

    def _router(self, *, change: bool) -> AsyncRouter:
        if self.router is None or self.settings.routing is None:
            raise PermissionDeniedError(
                "Routing is not configured on this server: add a `routing` section to the config."
            )
        if change and not self.settings.routing.admin_enabled:
            raise PermissionDeniedError(
                "Changing routes at run time is disabled: set routing.admin_enabled: true in the config."
            )
        return self.router

    def list_routes(self) -> RouteList:
        table = self._router(change=False).router.table
        cards = [
            RouteCard(
                name=route.spec.key,
                adapter=route.spec.adapter,
                utterances=route.spec.utterances,
                keywords=route.spec.keywords,
                threshold=route.threshold,
                tenant=route.spec.tenant,
            )
            for route in table.routes
        ]
        return RouteList(data=cards)

    async def put_route(self, name: str, spec: RouteSpec) -> tuple[RouteCard, bool]:
        """Add or replace route ``name``; True when it was created."""
        router = self._router(change=True)
        if spec.name is not None and spec.name != name:
            raise InvalidRequestError(
                f"The body names route {spec.name!r} but the path names {name!r}; drop `name` from the body.",
                param="name",
            )
        try:
            await asyncio.to_thread(self.resolve, spec.adapter)  # reads (and may fetch into) the store
        except ModelNotFoundError as e:
            raise InvalidRequestError(
                f"Route {name!r} targets a model that is not served. {e.message}", param="adapter"
            ) from e
        replaced = await router.put_route(spec.model_copy(update={"name": name}))
        card = next(c for c in self.list_routes().data if c.name == name)
        return card, not replaced

    async def delete_route(self, name: str) -> RouteDeleted:
        router = self._router(change=True)
        if not await router.delete_route(name):
            raise RouteNotFoundError(name, [s.key for s in router.router.table.specs])
        return RouteDeleted(name=name)
