"""Routes of /v1/models."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request, Response

from serving.api.auth import PrincipalDep
from serving.api.errors import ErrorResponse
from serving.api.models.protocol import ModelList
from serving.api.models.serving import ModelsServing

router = APIRouter(tags=["models"])


def models_serving(request: Request) -> ModelsServing:
    """Built with the engine by :mod:`serving.api.app`, which holds it on ``app.state``."""
    return request.app.state.models_serving


ModelsServingDep = Annotated[ModelsServing, Depends(models_serving)]


@router.get("/v1/models", response_model=ModelList, responses={401: {"model": ErrorResponse}})
async def list_models(serving: ModelsServingDep, principal: PrincipalDep) -> Response:
    """Serialized once, by pydantic-core, off the event loop: FastAPI's own pass over a returned model would
    validate and encode every card again, on the loop, which at thousands of adapters costs more than building
    the list."""
    return Response(await serving.list_models(principal), media_type="application/json")


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
