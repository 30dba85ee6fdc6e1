"""Serving class of /admin/routes: list, add or replace, and delete routes without a restart.

Changes live in memory (the routes file is not rewritten); a route must point
at a model this server serves, checked through the same resolution as a
client's ``model``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from routing import AsyncPromptRouter, RouteSpec
from serving.api.errors import InvalidRequestError, ModelNotFoundError, PermissionDeniedError, RouteNotFoundError
from serving.api.prompt_routes.protocol import RouteCard, RouteDeleted, RouteList
from serving.config import Settings


class PromptRoutesServing:
    def __init__(
        self, settings: Settings, prompt_router: AsyncPromptRouter | None, resolve: Callable[[str], object]
    ) -> None:
        self.settings = settings
        self.prompt_router = prompt_router
        self.resolve = resolve

    def _prompt_router(self, *, change: bool) -> AsyncPromptRouter:
        if self.prompt_router is None or self.settings.routing is None:
            raise PermissionDeniedError(
                "Routing is not configured on this server: add a `routing` section to the config."
            )
        if change and not self.settings.routing.admin_enabled:
            raise PermissionDeniedError(
                "Changing routes at run time is disabled: set routing.admin_enabled: true in the config."
            )
        return self.prompt_router

    def list_routes(self) -> RouteList:
        table = self._prompt_router(change=False).table
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
        prompt_router = self._prompt_router(change=True)
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
        replaced = await prompt_router.put_route(spec.model_copy(update={"name": name}))
        card = next(c for c in self.list_routes().data if c.name == name)
        return card, not replaced

    async def delete_route(self, name: str) -> RouteDeleted:
        prompt_router = self._prompt_router(change=True)
        if not await prompt_router.delete_route(name):
            raise RouteNotFoundError(name, [s.key for s in prompt_router.table.specs])
        return RouteDeleted(name=name)
