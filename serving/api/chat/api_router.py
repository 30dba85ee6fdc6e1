"""Routes of /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request, Response

from serving.api.chat.protocol import ChatCompletionRequest, ChatCompletionResponse
from serving.api.deps import ChatServingDep
from serving.api.errors import ErrorResponse

router = APIRouter(tags=["chat"])


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
async def create_chat_completion(request: ChatCompletionRequest, raw: Request, response: Response, serving: ChatServingDep):
    return await serving.respond(request, raw, response)


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
