"""API keys: who is calling, for which tenant, in which role.

Keys travel as ``Authorization: Bearer <key>`` (OpenAI's convention). The
server never holds a key in plain text: the keys file lists SHA-256 digests
(keys are 256-bit random tokens, so a fast hash is enough), and a presented
key is hashed and compared with every digest in constant time.

Authentication runs as ASGI middleware, before the body is read, so a caller
without a valid key cannot make the server parse anything. Authorization
(admin role, tenant of an adapter) is decided where the resource is known,
except for the ``metrics`` role, which is a rule on paths and so is decided in
the middleware too (see :meth:`Principal.may_call`).

Roles: ``user`` calls the API (its tenant's and public adapters); ``metrics``
reads ``/metrics`` and nothing else (a scraper's key: the series name every
adapter, private ones included); ``admin`` may do everything.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.api.errors import AuthenticationError, PermissionDeniedError, error_response
from serving.config import TENANT_PATTERN, AuthSettings, ConfigError, RateSettings
from serving.metrics import AdapterMetrics

logger = logging.getLogger(__name__)

KEY_PREFIX = "sk-ls-"
# Paths anyone may call: probes and the API description.
PUBLIC_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
# Paths only the metrics and admin roles may call, and the only ones (besides the public) a metrics key may.
METRICS_PATHS = frozenset({"/metrics"})

Role = Literal["user", "metrics", "admin"]


@dataclass(frozen=True)
class Principal:
    """The caller of one request; in open mode everyone is :data:`OPEN_PRINCIPAL`."""

    key_id: str
    tenant: str | None
    role: Role
    rate: RateSettings | None = None  # overrides limits.rate for this key
    max_concurrent: int | None = None  # overrides limits.max_concurrent_per_key

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_use(self, owner: str | None) -> bool:
        """Public resources are everyone's; owned ones their tenant's and the operators' (admin role)."""
        return owner is None or self.is_admin or owner == self.tenant

    def may_call(self, path: str) -> bool:
        """The role's rule on paths: /metrics is for metrics and admin keys, a metrics key gets nothing else."""
        if path in METRICS_PATHS:
            return self.role in ("metrics", "admin")
        return self.role != "metrics" or path in PUBLIC_PATHS


OPEN_PRINCIPAL = Principal(key_id="open", tenant=None, role="admin")


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="Shown in logs instead of the key.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tenant: str | None = Field(default=None, pattern=TENANT_PATTERN)
    role: Role = Field(default="user", description="user: the API; metrics: /metrics only; admin: everything.")
    rate: RateSettings | None = Field(default=None, description="This key's token bucket instead of limits.rate.")
    max_concurrent: int | None = Field(default=None, ge=1, description="Instead of limits.max_concurrent_per_key.")

    def principal(self) -> Principal:
        return Principal(self.id, self.tenant, self.role, self.rate, self.max_concurrent)


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: list[KeyEntry]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyStore:
    """The hashed keys; ``verify`` costs the same whichever key (if any) matches."""

    def __init__(self, entries: list[KeyEntry]) -> None:
        ids = [e.id for e in entries]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"auth keys: ids must be unique, got {sorted(ids)}")
        self._entries = [(bytes.fromhex(e.sha256), e) for e in entries]

    @classmethod
    def from_settings(cls, auth: AuthSettings) -> KeyStore | None:
        """``None`` in open mode; the keys from the configured file or variable otherwise."""
        if auth.mode == "open":
            return None
        if auth.keys_file is not None:
            source, text = str(auth.keys_file), _read(auth.keys_file)
        else:
            value = os.environ.get(auth.keys_env or "")
            if value is None:
                raise ConfigError(f"auth.keys_env: environment variable {auth.keys_env} is not set")
            source, text = f"${auth.keys_env}", value
        try:
            return cls(KeysFile.model_validate(yaml.safe_load(text)).keys)
        except (yaml.YAMLError, ValidationError) as e:
            raise ConfigError(f"auth keys {source} are invalid: {e}") from e

    def verify(self, key: str) -> KeyEntry | None:
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for expected, entry in self._entries:
            if hmac.compare_digest(digest, expected):
                found = entry
        return found


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise ConfigError(f"auth.keys_file: cannot read {path}: {e.strerror}") from e


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class AuthMiddleware:
    """Attach a :class:`Principal` to every request, or answer 401 before reading the body."""

    def __init__(self, app: ASGIApp, keys: KeyStore | None) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        principal = self._principal(scope)
        if principal is None and scope["path"] not in PUBLIC_PATHS:
            error = self._denial(scope)
            await error_response(error)(scope, receive, send)
            return
        denial = None if principal is None else _role_denial(scope, principal)
        if denial is not None:  # decided before the body is read: a user's upload is never received
            await error_response(denial)(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)

    def _principal(self, scope: Scope) -> Principal | None:
        if self.keys is None:
            return OPEN_PRINCIPAL
        token = bearer_token(scope)
        entry = None if token is None else self.keys.verify(token)
        return None if entry is None else entry.principal()

    def _denial(self, scope: Scope) -> AuthenticationError:
        token = bearer_token(scope)
        reason = "missing_key" if token is None else "invalid_key"
        # Never log a key; a short digest prefix is enough to correlate attempts.
        who = "-" if token is None else "sha256:" + hash_key(token)[:8]
        logger.warning("denied %s %s: %s (%s)", scope["method"], scope["path"], reason, who)
        count_denial(scope, reason)
        if token is None:
            return AuthenticationError(
                "Missing API key: send it as 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        return AuthenticationError("Incorrect API key provided.", code="invalid_api_key")


def admin_only(scope: Scope) -> bool:
    """Routes only admins may call that take a body: the route admin, and every write to the adapter store."""
    path = scope["path"]
    if path.startswith("/admin/"):
        return True
    return scope["method"] not in ("GET", "HEAD") and (path == "/v1/adapters" or path.startswith("/v1/adapters/"))


def _role_denial(scope: Scope, principal: Principal) -> PermissionDeniedError | None:
    """403 for a valid key on a path its role may not call, counted and logged; ``None`` if it may.

    The routes check the admin role too (``AdminDep``); deciding here, in the
    middleware, keeps a non-admin's body (an upload) from being read at all.
    """
    method, path = scope["method"], scope["path"]
    if not principal.may_call(path):
        metrics_path = path in METRICS_PATHS
        reason = "not_metrics" if metrics_path else "metrics_only"
        message = (
            "/metrics needs an API key with the metrics or admin role."
            if metrics_path
            else "This API key has the metrics role: it may only read /metrics."
        )
    elif not principal.is_admin and admin_only(scope):
        reason, message = "not_admin", "This endpoint needs an API key with the admin role."
    else:
        return None
    logger.warning("denied %s %s: key %s has the %s role (%s)", method, path, principal.key_id, principal.role, reason)
    count_denial(scope, reason)
    return PermissionDeniedError(message)


def count_denial(scope: Scope, reason: str) -> None:
    """Every denied request is counted, whoever denied it (middleware or a route)."""
    metrics: AdapterMetrics | None = getattr(scope["app"].state, "metrics", None)  # set once the engine is up
    if metrics is not None:
        metrics.denied.labels(reason).inc()


async def _principal(request: Request) -> Principal:
    """The caller the middleware authenticated.

    ``async`` (as every dependency here): FastAPI runs a plain ``def`` dependency in its thread pool, a thread
    hop per request that waits for the GIL when the loop is busy.
    """
    principal = request.scope.get("state", {}).get("principal")
    if principal is None:  # a public path reached a route that needs a caller: treat as unauthenticated
        raise AuthenticationError("Missing API key: send it as 'Authorization: Bearer <key>'.", code="missing_api_key")
    return principal


async def _admin(request: Request, principal: Annotated[Principal, Depends(_principal)]) -> Principal:
    if not principal.is_admin:
        logger.warning("denied %s %s: key %s lacks the admin role", request.method, request.url.path, principal.key_id)
        count_denial(request.scope, "not_admin")
        raise PermissionDeniedError("This endpoint needs an API key with the admin role.")
    return principal


PrincipalDep = Annotated[Principal, Depends(_principal)]
AdminDep = Annotated[Principal, Depends(_admin)]
