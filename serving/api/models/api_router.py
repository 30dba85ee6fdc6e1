"""Routes of /v1/models."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from serving.api.deps import ModelsServingDep
from serving.api.models.protocol import ModelList

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelList)
async def list_models(serving: ModelsServingDep) -> ModelList:
    return serving.list_models()


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
