"""Routes of /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request

from serving.api.chat.protocol import ChatCompletionRequest, ChatCompletionResponse
from serving.api.deps import ChatServingDep
from serving.api.disconnect import cancel_on_disconnect, event_stream
from serving.api.errors import ErrorResponse

router = APIRouter(tags=["chat"])


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
async def create_chat_completion(request: ChatCompletionRequest, raw: Request, serving: ChatServingDep):
    job = await serving.prepare(request)
    if request.stream:
        return await event_stream(serving.stream(request, job))
    return await cancel_on_disconnect(raw, serving.complete(request, job))


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
