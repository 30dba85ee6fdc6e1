"""/metrics behind keys, and admin keyword rules that cannot stall the server, through the real server.

The shared ``secure`` server (tests/e2e/conftest.py), with keys of this
module's own (a user, a metrics and an admin key) and the demo routes with
run-time route changes on. ``medical`` belongs to a tenant, so its name in the
metrics is one a user key must not read. Routes a test adds are its own and
deleted afterwards.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import REPO, RunningServer, free_port
from tests.e2e.conftest import MAX_BODY, keys_of

pytestmark = pytest.mark.engine

KEYS = keys_of("metrics")
# Backtracking needs ~2^n steps for each run of n x's without a y: 11 s for 28 on Python's re.
STALLING_PATTERN = "(x+x+)+y"
LONG_PROMPT = ("x" * 30 + " ") * 2000  # 62 KB of 30-x runs, under the shared server's 64 KiB body limit
assert len(LONG_PROMPT) < MAX_BODY - 1024


@pytest.fixture
def route_name(secure) -> Iterator[str]:
    """A route name of this test's own, deleted afterwards: the shared server's routing is as it was."""
    name = f"stall-{uuid.uuid4().hex[:8]}"
    yield name
    httpx.delete(f"{secure.url}/admin/routes/{name}", headers=auth("admin"))


def auth(role: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[role]}"} if role else {}


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def denials(server: RunningServer) -> dict[str, float]:
    """loraserve_denied_requests_total by reason, read with the admin key."""
    text = httpx.get(f"{server.url}/metrics", headers=auth("admin")).text
    found = re.finditer(r'^loraserve_denied_requests_total\{reason="(\w+)"\} (\S+)$', text, re.M)
    return {match[1]: float(match[2]) for match in found}


@pytest.mark.parametrize(
    ("role", "status", "code"),
    [(None, 401, "missing_api_key"), ("user", 403, "permission_denied"), ("metrics", 200, None), ("admin", 200, None)],
)
def test_metrics_need_a_metrics_or_admin_key(secure, role, status, code):
    response = httpx.get(f"{secure.url}/metrics", headers=auth(role))
    assert response.status_code == status
    if code is None:
        # the series name every adapter, the tenant's private one included: for operators only
        assert 'loraserve_adapter_health{adapter="medical"' in response.text
        assert 'loraserve_adapter_loaded{adapter="medical",tier="disk"' in response.text  # what it holds, too
        assert "vllm:" in response.text
    else:
        error = error_of(response)
        assert error["code"] == code and "medical" not in response.text
        assert "metrics" in error["message"] or status == 401


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/completions", {"model": "code", "prompt": "def f():", "max_tokens": 2}),
        ("POST", "/v1/chat/completions", {"model": "code", "messages": [{"role": "user", "content": "hi"}]}),
        ("GET", "/v1/models", None),
        ("GET", "/admin/routes", None),
        ("GET", "/v1/adapters", None),
    ],
)
def test_a_metrics_key_reads_metrics_and_nothing_else(secure, method, path, body):
    response = httpx.request(method, f"{secure.url}{path}", json=body, headers=auth("metrics"), timeout=60)
    assert response.status_code == 403
    error = error_of(response)
    assert error["code"] == "permission_denied" and "metrics role" in error["message"]
    assert httpx.get(f"{secure.url}/health", headers=auth("metrics")).status_code == 200


def test_denials_are_counted_by_reason(secure):
    before = denials(secure)
    assert httpx.get(f"{secure.url}/metrics").status_code == 401
    for _ in range(2):
        assert httpx.get(f"{secure.url}/metrics", headers=auth("user")).status_code == 403
    for _ in range(3):
        assert httpx.get(f"{secure.url}/v1/models", headers=auth("metrics")).status_code == 403
    assert httpx.get(f"{secure.url}/metrics", headers=auth("metrics")).status_code == 200  # not a denial
    after = denials(secure)
    delta = {reason: after.get(reason, 0.0) - before.get(reason, 0.0) for reason in after}
    assert delta == {**{reason: 0.0 for reason in after}, "missing_key": 1.0, "not_metrics": 2.0, "metrics_only": 3.0}


def test_the_relay_serves_the_metrics_with_the_metrics_key(secure, tmp_path):
    """What the endpoint picker scrapes in Kubernetes (it cannot send a key): the relay beside the server."""
    (tmp_path / "token").write_text(KEYS["metrics"] + "\n")
    port = free_port()
    command = ["metrics-relay", "--upstream", f"{secure.url}/metrics", "--token-file", str(tmp_path / "token")]
    relay = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", *command, "--host", "127.0.0.1", "--port", str(port)], cwd=REPO
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and relay.poll() is None, "the relay did not start"
                time.sleep(0.2)
        assert response.status_code == 200
        assert "vllm:num_requests_waiting" in response.text
        assert 'loraserve_adapter_health{adapter="medical"' in response.text
        assert httpx.post(f"http://127.0.0.1:{port}/metrics").status_code == 405
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 404
    finally:
        relay.terminate()
        relay.wait(timeout=30)


def test_a_route_with_lookaround_is_refused_naming_the_field(secure):
    spec = {"adapter": "code", "keywords": [{"patterns": ["(?<!un)safe"]}]}
    response = httpx.put(
        f"{secure.url}/admin/routes/lookbehind-{uuid.uuid4().hex[:8]}", json=spec, headers=auth("admin")
    )
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == "keywords.0.patterns" and "RE2 syntax" in error["message"]


async def test_a_backtracking_pattern_cannot_stall_the_server(secure, route_name):
    spec = {"adapter": "code", "keywords": [{"patterns": [STALLING_PATTERN]}]}
    put = httpx.put(f"{secure.url}/admin/routes/{route_name}", json=spec, headers=auth("admin"))
    assert put.status_code in (200, 201), put.text
    async with httpx.AsyncClient(base_url=secure.url, timeout=120) as client:
        body = {"model": "auto", "prompt": LONG_PROMPT, "max_tokens": 2}
        routed = asyncio.create_task(client.post("/v1/completions", json=body, headers=auth("admin")))
        await asyncio.sleep(0.5)  # the request is in the server while /health is asked
        start = time.perf_counter()
        health = await client.get("/health", timeout=10)
        health_s = time.perf_counter() - start
        response = await routed
    assert health.status_code == 200 and health_s < 2.0
    # routed (the stalling rule did not match), then refused for its length: an answer, in seconds
    assert response.status_code == 400 and error_of(response)["code"] == "context_length_exceeded", response.text
    # and the rule itself still works on a short prompt
    short = httpx.post(
        f"{secure.url}/v1/completions",
        json={"model": "auto", "prompt": "xxxxy please", "max_tokens": 2},
        headers=auth("admin"),
        timeout=60,
    )
    assert short.status_code == 200 and short.headers["x-routed-adapter"] == "code"
    assert short.headers["x-route-method"] == "keyword"
