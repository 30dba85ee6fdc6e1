"""Routes of /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request

from serving.api.completions.protocol import CompletionRequest, CompletionResponse
from serving.api.deps import CompletionServingDep
from serving.api.disconnect import cancel_on_disconnect, event_stream
from serving.api.errors import ErrorResponse

router = APIRouter(tags=["completions"])


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
async def create_completion(request: CompletionRequest, raw: Request, serving: CompletionServingDep):
    job = await serving.prepare(request)
    if request.stream:
        return await event_stream(serving.stream(request, job))
    return await cancel_on_disconnect(raw, serving.complete(request, job))


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
