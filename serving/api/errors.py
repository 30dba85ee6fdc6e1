"""One error model for the whole API, built by one helper from typed exceptions.

Every error response has OpenAI's shape::

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

Code raises a :class:`ServingError` subclass. :func:`error_response` is the one
builder of that shape: the exception handlers installed by
:func:`install_error_handlers` use it (FastAPI's own validation and routing
errors are first turned into a :class:`ServingError`), and so do the ASGI
middlewares that answer before the application runs (auth, body limits). A
stream that fails after its first event sends :meth:`ServingError.body` as its
last event.
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
    RegistryUnavailable,
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

    def body(self) -> ErrorResponse:
        """The error in OpenAI's shape."""
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))


def error_response(exc: ServingError) -> JSONResponse:
    """The one place an error response is built: ``exc``'s status, headers and body."""
    return JSONResponse(status_code=exc.status, content=exc.body().model_dump(), headers=exc.headers)


def internal_error(exc: Exception) -> ServingError:
    """An unexpected failure as the client sees it: its class name, never its message (which may hold secrets)."""
    return ServingError(f"Internal server error ({type(exc).__name__}); see the server log.")


class HTTPStatusError(ServingError):
    """Starlette's own HTTP errors (an unknown path, a wrong method), typed by their status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        phrase = HTTPStatus(status).phrase
        self.status = status
        self.type = phrase.replace(" ", "") + "Error"


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


class RegistryUnavailableError(ServingError):
    """The adapter registry's database is unreachable: an admin change cannot be made now; retry."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    type = "ServiceUnavailableError"
    code = "registry_unavailable"


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
    RegistryUnavailable: (RegistryUnavailableError, "registry_unavailable"),
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
    """Route every failure through :func:`error_response`."""

    @app.exception_handler(ServingError)
    async def _serving_error(_: Request, exc: ServingError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(InvalidRequestError(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(HTTPStatusError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(internal_error(exc))
