"""Routes of /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request, Response

from serving.api.auth import PrincipalDep
from serving.api.chat.protocol import ChatCompletionRequest, ChatCompletionResponse
from serving.api.deps import ChatServingDep
from serving.api.errors import GENERATION_ERRORS

router = APIRouter(tags=["chat"])


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses=GENERATION_ERRORS,
)
async def create_chat_completion(
    request: ChatCompletionRequest, raw: Request, response: Response, serving: ChatServingDep, principal: PrincipalDep
):
    return await serving.respond(request, raw, response, principal)


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
