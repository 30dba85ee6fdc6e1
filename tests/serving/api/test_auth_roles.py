"""The roles' rule on paths: /metrics for metrics and admin keys only, a metrics key for nothing else.

Through the real :class:`AuthMiddleware` in front of a small FastAPI app (the
end-to-end check with the real server is tests/e2e/test_security_metrics.py).
"""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from serving.api.auth import OPEN_PRINCIPAL, AuthMiddleware, KeyEntry, KeyStore, Principal, hash_key
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
        ("admin", "/v1/adapters", True),
    ],
)
def test_may_call(role, path, allowed):
    assert Principal("k", None, role).may_call(path) is allowed


def test_open_mode_may_read_metrics():
    assert OPEN_PRINCIPAL.may_call("/metrics")


def test_keys_file_accepts_the_metrics_role():
    assert KeyEntry(id="scraper", sha256=hash_key("sk-x"), role="metrics").principal().role == "metrics"


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
