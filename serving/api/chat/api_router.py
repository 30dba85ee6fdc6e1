"""Routes of /v1/chat/completions."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request, Response

from serving.api.auth import PrincipalDep
from serving.api.chat.protocol import ChatCompletionRequest, ChatCompletionResponse
from serving.api.chat.serving import ChatServing
from serving.api.errors import GENERATION_ERRORS

router = APIRouter(tags=["chat"])


async def chat_serving(request: Request) -> ChatServing:
    """Built with the engine by :mod:`serving.api.app`, which holds it on ``app.state``.

    ``async``: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop per request.
    """
    return request.app.state.chat_serving


ChatServingDep = Annotated[ChatServing, Depends(chat_serving)]


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
