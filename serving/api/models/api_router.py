"""Routes of /v1/models."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from serving.api.auth import PrincipalDep
from serving.api.deps import ModelsServingDep
from serving.api.errors import ErrorResponse
from serving.api.models.protocol import ModelList

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelList, responses={401: {"model": ErrorResponse}})
async def list_models(serving: ModelsServingDep, principal: PrincipalDep) -> ModelList:
    return await serving.list_models(principal)


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
