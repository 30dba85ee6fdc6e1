"""The request path makes no hidden thread hops: FastAPI and Starlette run plain ``def`` callables in a pool.

A sync dependency, or a sync background task, costs each request a trip to a
worker thread and back, which waits for the GIL whenever the event loop is
busy (issue 16: the gateway's cost per request). Every dependency of the
generation routes, and the stream's closing task, must be ``async``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from serving.api.app import _API_ROUTERS
from serving.api.disconnect import event_stream

HOT_PATHS = [("/v1/completions", "POST"), ("/v1/chat/completions", "POST"), ("/health", "GET")]


def dependencies(dependant: Dependant) -> Iterator[Dependant]:
    for dependency in dependant.dependencies:
        yield dependency
        yield from dependencies(dependency)


def app() -> FastAPI:
    application = FastAPI()
    for api in _API_ROUTERS:
        api.attach_router(application)
    return application


@pytest.mark.parametrize(("path", "method"), HOT_PATHS)
def test_every_dependency_of_a_hot_route_runs_on_the_loop(path: str, method: str) -> None:
    routes = [r for r in app().routes if isinstance(r, APIRoute) and r.path == path and method in r.methods]
    assert len(routes) == 1
    found = list(dependencies(routes[0].dependant))
    assert found or path == "/health"
    for dependency in found:
        assert inspect.iscoroutinefunction(dependency.call), f"{dependency.call} would run in a thread"


async def test_the_stream_closes_on_the_loop_once_per_call() -> None:
    async def events():
        yield "data: 1\n\n"

    closed: list[int] = []
    response = await event_stream(events(), on_close=lambda: closed.append(1))
    assert response.background is not None and response.background.is_async
    await response.background()
    assert closed == [1]
