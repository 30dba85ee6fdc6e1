"""Liveness/readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from serving.api.errors import EngineUnavailableError, ErrorResponse
from serving.engine import LoraEngine

router = APIRouter(tags=["system"])


async def engine(request: Request) -> LoraEngine:
    """Started in the lifespan by :mod:`serving.api.app`, which holds it on ``app.state``.

    ``async``: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop per request.
    """
    return request.app.state.engine


EngineDep = Annotated[LoraEngine, Depends(engine)]


@router.get("/health", responses={503: {"description": "engine not ready or dead"}})
async def health(engine: EngineDep) -> Response:
    """200 only while the engine is up and answering; 503 otherwise."""
    if not engine.ready:
        raise EngineUnavailableError("The engine is not ready.")
    try:
        await engine.check_health()
    except Exception as e:
        raise EngineUnavailableError(f"The engine is unhealthy: {type(e).__name__}.") from e
    return Response(status_code=200)


@router.get("/metrics", responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}})
async def metrics() -> Response:
    """vLLM's ``vllm:*`` metrics and the per-adapter ``loraserve_*`` metrics.

    The series name every adapter, private ones included, so with API keys on
    only a metrics or admin key may read them (decided in the auth middleware).
    """
    body = await asyncio.to_thread(generate_latest, REGISTRY)  # the store's collector reads SQLite
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
