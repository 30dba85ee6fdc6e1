"""Routes of /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request, Response

from serving.api.completions.protocol import CompletionRequest, CompletionResponse
from serving.api.deps import CompletionServingDep
from serving.api.errors import ErrorResponse

router = APIRouter(tags=["completions"])


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
async def create_completion(request: CompletionRequest, raw: Request, response: Response, serving: CompletionServingDep):
    return await serving.respond(request, raw, response)


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
