"""Routes of /v1/completions."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request, Response

from serving.api.auth import PrincipalDep
from serving.api.completions.protocol import CompletionRequest, CompletionResponse
from serving.api.completions.serving import CompletionServing
from serving.api.errors import GENERATION_ERRORS

router = APIRouter(tags=["completions"])


async def completion_serving(request: Request) -> CompletionServing:
    """Built with the engine by :mod:`serving.api.app`, which holds it on ``app.state``.

    ``async``: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop per request.
    """
    return request.app.state.completion_serving


CompletionServingDep = Annotated[CompletionServing, Depends(completion_serving)]


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
