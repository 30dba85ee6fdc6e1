"""A request's failure -> one error response: status, OpenAI's body shape and headers.

Through FastAPI's TestClient on a small app with the real handlers
(:func:`install_error_handlers`); the middlewares' errors are the same builder
(tests/serving/api/test_auth_roles.py, test_body_limits.py).
"""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field

from serving.api.errors import (
    AdapterUnavailableError,
    AuthenticationError,
    ClientDisconnectedError,
    ConflictError,
    ContextLengthError,
    EngineUnavailableError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    RouteNotFoundError,
    ServerBusyError,
    ServingError,
    StorageFullError,
    install_error_handlers,
)

ERRORS: dict[str, ServingError] = {
    "invalid": InvalidRequestError("bad n", param="n"),
    "context": ContextLengthError("too long", param="prompt"),
    "model": ModelNotFoundError("nope", ["base", "code"]),
    "auth": AuthenticationError("no key", code="missing_api_key"),
    "forbidden": PermissionDeniedError("not yours"),
    "large": PayloadTooLargeError("too big"),
    "rate": RateLimitError("slow down", retry_after=2.2),
    "busy": ServerBusyError("full", retry_after=0.1),
    "route": RouteNotFoundError("r", []),
    "unavailable": AdapterUnavailableError("loading"),
    "gone": NotFoundError("no such thing"),
    "conflict": ConflictError("in use"),
    "full": StorageFullError("disk"),
    "engine": EngineUnavailableError("down"),
    "disconnected": ClientDisconnectedError("left"),
}


class Body(BaseModel):
    n: int = Field(ge=1)


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/raise/{name}")
    async def raise_(name: str) -> None:
        raise ERRORS[name]

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret detail")

    @app.post("/body")
    async def body(body: Body) -> dict:
        return body.model_dump()

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize(
    ("name", "status", "type_", "code", "param", "headers"),
    [
        ("invalid", 400, "BadRequestError", "invalid_request", "n", {}),
        ("context", 400, "BadRequestError", "context_length_exceeded", "prompt", {}),
        ("model", 404, "NotFoundError", "model_not_found", "model", {}),
        ("auth", 401, "AuthenticationError", "missing_api_key", None, {"www-authenticate": "Bearer"}),
        ("forbidden", 403, "PermissionDeniedError", "permission_denied", None, {}),
        ("large", 413, "BadRequestError", "payload_too_large", None, {}),
        ("rate", 429, "RateLimitError", "rate_limit_exceeded", None, {"retry-after": "3"}),  # rounded up
        ("busy", 503, "ServiceUnavailableError", "server_overloaded", None, {"retry-after": "1"}),  # at least 1
        ("route", 404, "NotFoundError", "route_not_found", "name", {}),
        ("unavailable", 503, "ServiceUnavailableError", "adapter_unavailable", None, {}),
        ("gone", 404, "NotFoundError", "not_found", None, {}),
        ("conflict", 409, "ConflictError", "conflict", None, {}),
        ("full", 507, "InsufficientStorageError", "cache_full", None, {}),
        ("engine", 503, "ServiceUnavailableError", "engine_unavailable", None, {}),
        ("disconnected", 499, "ClientClosedRequest", "client_disconnected", None, {}),
    ],
)
def test_a_serving_error_is_its_status_shape_and_headers(client, name, status, type_, code, param, headers):
    response = client.get(f"/raise/{name}")
    assert response.status_code == status
    assert response.json() == {"error": {"message": ERRORS[name].message, "type": type_, "param": param, "code": code}}
    assert {k: response.headers.get(k) for k in headers} == headers
    if not headers:
        assert "retry-after" not in response.headers and "www-authenticate" not in response.headers


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error"),
    [
        (
            "POST",
            "/body",
            {"n": 0},
            400,
            {"type": "BadRequestError", "code": "invalid_request", "param": "n"},
        ),
        ("POST", "/body", {}, 400, {"type": "BadRequestError", "code": "invalid_request", "param": "n"}),
        ("GET", "/nowhere", None, 404, {"type": "NotFoundError", "code": None, "param": None}),
        ("GET", "/body", None, 405, {"type": "MethodNotAllowedError", "code": None, "param": None}),
        ("GET", "/boom", None, 500, {"type": "InternalServerError", "code": None, "param": None}),
    ],
)
def test_framework_and_unexpected_errors_take_the_same_shape(client, method, path, body, status, error):
    response = client.request(method, path, json=body)
    assert response.status_code == status
    got = response.json()["error"]
    assert set(got) == {"message", "type", "param", "code"}
    assert {k: got[k] for k in error} == error


def test_a_validation_error_names_every_field_and_an_unexpected_one_hides_its_message(client):
    assert client.post("/body", json={"n": 0}).json()["error"]["message"].startswith("Invalid request: n: ")
    message = client.get("/boom").json()["error"]["message"]
    assert "RuntimeError" in message and "secret detail" not in message
