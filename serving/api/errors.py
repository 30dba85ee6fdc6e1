"""One error model for the whole API, built by one helper from typed exceptions.

Every error response has OpenAI's shape::

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

Code raises a :class:`ServingError` subclass; the exception handlers installed
by :func:`install_error_handlers` turn it (and FastAPI's own validation and
routing errors) into that shape. Nothing else builds error responses.
"""

from __future__ import annotations

import logging
import math
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapter_store import (
    AdapterInUse,
    AdapterNotFound,
    AdapterPinned,
    AdapterStoreError,
    AmbiguousVersion,
    CacheFull,
    InvalidAdapter,
    InvalidRef,
    LegacyDigest,
    OwnershipConflict,
    SourceError,
    VersionConflict,
)

logger = logging.getLogger(__name__)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ServingError(Exception):
    """Base of the domain errors the API maps to HTTP statuses."""

    status: int = HTTPStatus.INTERNAL_SERVER_ERROR
    type: str = "InternalServerError"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    @property
    def headers(self) -> dict[str, str] | None:
        """Extra response headers (``Retry-After``, ``WWW-Authenticate``)."""
        return None


class InvalidRequestError(ServingError):
    status = HTTPStatus.BAD_REQUEST
    type = "BadRequestError"
    code = "invalid_request"


class ContextLengthError(InvalidRequestError):
    code = "context_length_exceeded"


class ModelNotFoundError(ServingError):
    status = HTTPStatus.NOT_FOUND
    type = "NotFoundError"
    code = "model_not_found"

    def __init__(self, model: str, available: list[str]) -> None:
        super().__init__(
            f"The model {model!r} does not exist. Served models: {', '.join(available)}. GET /v1/models lists them.",
            param="model",
        )


class AuthenticationError(ServingError):
    status = HTTPStatus.UNAUTHORIZED
    type = "AuthenticationError"
    code = "invalid_api_key"

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class PermissionDeniedError(ServingError):
    status = HTTPStatus.FORBIDDEN
    type = "PermissionDeniedError"
    code = "permission_denied"


class PayloadTooLargeError(ServingError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    type = "BadRequestError"
    code = "payload_too_large"


class _RetryLater(ServingError):
    """An error the client should retry after ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = max(1, math.ceil(retry_after))

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class RateLimitError(_RetryLater):
    status = HTTPStatus.TOO_MANY_REQUESTS
    type = "RateLimitError"
    code = "rate_limit_exceeded"


class ServerBusyError(_RetryLater):
    """The server-wide queue is full: a quick 503 beats unbounded latency."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    type = "ServiceUnavailableError"
    code = "server_overloaded"


class RouteNotFoundError(ServingError):
    status = HTTPStatus.NOT_FOUND
    type = "NotFoundError"
    code = "route_not_found"

    def __init__(self, name: str, available: list[str]) -> None:
        super().__init__(
            f"The route {name!r} does not exist. Routes: {', '.join(available) or 'none'}. GET /admin/routes lists them.",
            param="name",
        )


class AdapterUnavailableError(ServingError):
    """An adapter exists but cannot be served right now (fallback policy ``error``)."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    type = "ServiceUnavailableError"
    code = "adapter_unavailable"


class NotFoundError(ServingError):
    status = HTTPStatus.NOT_FOUND
    type = "NotFoundError"
    code = "not_found"


class ConflictError(ServingError):
    status = HTTPStatus.CONFLICT
    type = "ConflictError"
    code = "conflict"


class StorageFullError(ServingError):
    status = HTTPStatus.INSUFFICIENT_STORAGE
    type = "InsufficientStorageError"
    code = "cache_full"


# Store errors as API errors: (class, code); ``InvalidAdapter`` keeps its own reason as the code.
_STORE_ERRORS: dict[type[AdapterStoreError], tuple[type[ServingError], str]] = {
    InvalidRef: (InvalidRequestError, "invalid_ref"),
    AdapterNotFound: (NotFoundError, "adapter_not_found"),
    AmbiguousVersion: (InvalidRequestError, "ambiguous_version"),
    InvalidAdapter: (InvalidRequestError, "invalid_adapter"),
    SourceError: (InvalidRequestError, "source_refused"),
    VersionConflict: (ConflictError, "version_conflict"),
    OwnershipConflict: (ConflictError, "ownership_conflict"),
    LegacyDigest: (ConflictError, "legacy_digest"),
    AdapterInUse: (ConflictError, "adapter_in_use"),
    AdapterPinned: (ConflictError, "adapter_pinned"),
    CacheFull: (StorageFullError, "cache_full"),
}


def store_error(exc: AdapterStoreError) -> ServingError:
    """The API error of an adapter-store error (``raise store_error(e) from e``)."""
    cls, code = _STORE_ERRORS[type(exc)]
    return cls(exc.message, param=exc.param, code=getattr(exc, "reason", code))


class ClientDisconnectedError(ServingError):
    """The client closed the connection; nobody reads this response (nginx's 499)."""

    status = 499
    type = "ClientClosedRequest"
    code = "client_disconnected"


class EngineUnavailableError(ServingError):
    status = HTTPStatus.SERVICE_UNAVAILABLE
    type = "ServiceUnavailableError"
    code = "engine_unavailable"


# The error statuses a generation endpoint documents in the OpenAPI schema.
GENERATION_ERRORS: dict[int | str, dict] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 503)
}
# ...and an admin endpoint of the adapter store.
ADMIN_ERRORS: dict[int | str, dict] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 409, 413, 503, 507)
}


def error_body(
    message: str, err_type: str, status: HTTPStatus, *, param: str | None = None, code: str | None = None
) -> JSONResponse:
    """The one place an error response is built."""
    body = ErrorResponse(error=ErrorInfo(message=message, type=err_type, param=param, code=code))
    return JSONResponse(status_code=status.value, content=body.model_dump())


def error_model(exc: ServingError) -> ErrorResponse:
    """The error body of ``exc``; also sent as the last event of a failed stream."""
    return ErrorResponse(error=ErrorInfo(message=exc.message, type=exc.type, param=exc.param, code=exc.code))


def create_error_response(exc: ServingError) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content=error_model(exc).model_dump(), headers=exc.headers)


def _validation_param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request body.", None
    first = errors[0]
    param = _validation_param(tuple(first.get("loc", ())))
    messages = [f"{_validation_param(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg')}" for e in errors]
    return "Invalid request: " + "; ".join(messages), param


def install_error_handlers(app: FastAPI) -> None:
    """Route every failure through :func:`error_body`."""

    @app.exception_handler(ServingError)
    async def _serving_error(_: Request, exc: ServingError) -> JSONResponse:
        return create_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_body(message, "BadRequestError", HTTPStatus.BAD_REQUEST, param=param, code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = HTTPStatus(exc.status_code)
        return error_body(str(exc.detail), status.phrase.replace(" ", "") + "Error", status)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_body(
            f"Internal server error ({type(exc).__name__}); see the server log.",
            "InternalServerError",
            HTTPStatus.INTERNAL_SERVER_ERROR,
        )
