"""Routes of /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request, Response

from serving.api.auth import PrincipalDep
from serving.api.completions.protocol import CompletionRequest, CompletionResponse
from serving.api.deps import CompletionServingDep
from serving.api.errors import GENERATION_ERRORS

router = APIRouter(tags=["completions"])


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses=GENERATION_ERRORS,
)
async def create_completion(
    request: CompletionRequest, raw: Request, response: Response, serving: CompletionServingDep, principal: PrincipalDep
):
    return await serving.respond(request, raw, response, principal)


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
