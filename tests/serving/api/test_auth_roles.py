"""The roles' rule on paths: /metrics for metrics and admin keys only, a metrics key for nothing else.

Through the real :class:`AuthMiddleware` in front of a small FastAPI app (the
end-to-end check with the real server is tests/e2e/test_security_metrics.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from serving.api.auth import (
    OPEN_PRINCIPAL,
    AuthMiddleware,
    KeyEntry,
    KeyStore,
    Principal,
    _role_denial,
    admin_only,
    hash_key,
)
from serving.api.errors import install_error_handlers
from serving.metrics import AdapterMetrics

KEYS = {"user": "sk-user", "metrics": "sk-metrics", "admin": "sk-admin"}


@pytest.mark.parametrize(
    ("role", "path", "allowed"),
    [
        ("user", "/metrics", False),
        ("metrics", "/metrics", True),
        ("admin", "/metrics", True),
        ("metrics", "/health", True),
        ("metrics", "/v1/completions", False),
        ("metrics", "/v1/models", False),
        ("metrics", "/admin/routes", False),
        ("user", "/v1/completions", True),
        ("user", "/health", True),
        ("user", "/v1/adapters", True),  # the path rule only; admin writes are decided by admin_only
        ("admin", "/v1/adapters", True),
        ("admin", "/admin/routes", True),
    ],
)
def test_may_call(role, path, allowed):
    assert Principal("k", None, role).may_call(path) is allowed


def test_open_mode_may_read_metrics():
    assert OPEN_PRINCIPAL.may_call("/metrics")


def test_keys_file_accepts_the_metrics_role():
    assert KeyEntry(id="scraper", sha256=hash_key("sk-x"), role="metrics").principal().role == "metrics"


@pytest.mark.parametrize(
    ("method", "path", "admin"),
    [
        ("PUT", "/admin/routes/x", True),
        ("GET", "/admin/routes", True),  # reading routes is admin too
        ("POST", "/v1/adapters", True),
        ("POST", "/v1/adapters/a/versions", True),
        ("DELETE", "/v1/adapters/a@v1", True),
        ("PUT", "/v1/adapters/a/pin", True),
        ("GET", "/v1/adapters", False),  # reads are decided by the route (AdminDep, or the tenant for health)
        ("GET", "/v1/adapters/a/health", False),
        ("HEAD", "/v1/adapters", False),
        ("POST", "/v1/completions", False),
        ("POST", "/v1/adaptersx", False),  # a prefix is not the path
    ],
)
def test_admin_only(method, path, admin):
    assert admin_only({"method": method, "path": path}) is admin


def denial_scope(method: str, path: str, metrics: AdapterMetrics) -> dict:
    return {"method": method, "path": path, "app": SimpleNamespace(state=SimpleNamespace(metrics=metrics))}


@pytest.mark.parametrize(
    ("role", "method", "path", "reason"),
    [
        ("user", "GET", "/metrics", "not_metrics"),
        ("metrics", "POST", "/v1/completions", "metrics_only"),
        ("metrics", "GET", "/v1/models", "metrics_only"),
        ("metrics", "PUT", "/admin/routes/x", "metrics_only"),  # the path rule is decided first
        ("user", "PUT", "/admin/routes/x", "not_admin"),
        ("user", "POST", "/v1/adapters/a/versions", "not_admin"),
        ("user", "DELETE", "/v1/adapters/a", "not_admin"),
        ("user", "POST", "/v1/completions", None),
        ("user", "GET", "/v1/adapters/a/health", None),
        ("metrics", "GET", "/metrics", None),
        ("metrics", "GET", "/health", None),
        ("admin", "GET", "/metrics", None),
        ("admin", "POST", "/v1/adapters/a/versions", None),
        ("admin", "PUT", "/admin/routes/x", None),
    ],
)
def test_role_denial(role, method, path, reason):
    """Each (role, method, path): denied with which reason, counted once; or let through, counted never."""
    metrics = AdapterMetrics(CollectorRegistry())
    denial = _role_denial(denial_scope(method, path, metrics), Principal("k", None, role))
    counted = {r: metrics.denied.labels(r)._value.get() for r in ("not_metrics", "metrics_only", "not_admin")}
    if reason is None:
        assert denial is None
        assert set(counted.values()) == {0}
    else:
        assert denial is not None and denial.status == 403 and denial.code == "permission_denied"
        assert counted == {r: float(r == reason) for r in counted}


@pytest.fixture
def app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.state.metrics = AdapterMetrics(CollectorRegistry())

    @app.get("/metrics")
    async def metrics() -> str:
        return "series"

    @app.get("/health")
    async def health() -> str:
        return "ok"

    @app.post("/v1/completions")
    async def completions() -> str:
        return "text"

    store = KeyStore([KeyEntry(id=role, sha256=hash_key(key), role=role) for role, key in KEYS.items()])
    app.add_middleware(AuthMiddleware, keys=store)
    return app


def denied(app: FastAPI, reason: str) -> float:
    return app.state.metrics.denied.labels(reason)._value.get()


@pytest.mark.parametrize(
    ("key", "method", "path", "status", "reason"),
    [
        (None, "GET", "/metrics", 401, "missing_key"),
        ("user", "GET", "/metrics", 403, "not_metrics"),
        ("metrics", "GET", "/metrics", 200, None),
        ("admin", "GET", "/metrics", 200, None),
        ("metrics", "POST", "/v1/completions", 403, "metrics_only"),
        ("metrics", "GET", "/health", 200, None),
        (None, "GET", "/health", 200, None),
    ],
)
async def test_middleware_applies_the_rule_and_counts_denials(app, key, method, path, status, reason):
    headers = {"Authorization": f"Bearer {KEYS[key]}"} if key else {}
    before = denied(app, reason) if reason else 0.0
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        response = await client.request(method, path, headers=headers)
    assert response.status_code == status
    if reason:
        error = response.json()["error"]
        assert error["code"] == ("permission_denied" if status == 403 else "missing_api_key")
        assert denied(app, reason) == before + 1
    if status == 403:
        assert "metrics" in error["message"]
