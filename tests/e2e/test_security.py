"""Keys, tenants and limits through the real server.

The shared ``secure`` server (tests/e2e/conftest.py): ``medical`` belongs to
tenant ``hospital``, ``legal`` to ``lawfirm``, ``code`` is public. Each limit
test uses its own key, so the per-key buckets and counters of one test never
touch another's; counters are compared before and after, and every name a test
registers or creates is its own (``unique``), so each test passes alone, in any
order and next to the other modules on that server.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import pytest

from serving.api.auth import new_key
from tests.conftest import RunningServer
from tests.e2e.adapter_files import WEIGHTS, broken_adapter, copy_adapter
from tests.e2e.conftest import ENGINE_SLOTS, MAX_BODY, PER_KEY_CONCURRENCY, RATE_BURST, keys_of
from tests.e2e.conftest import SECURE_LIMITS as LIMITS

pytestmark = pytest.mark.engine

KEYS = keys_of("security")


def unique(name: str) -> str:
    """A name no other test (or earlier run on the same server) uses."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def complete(server: RunningServer, key: str | None, **body) -> httpx.Response:
    body = {"model": server.base_model, "prompt": "The patient", "max_tokens": 2, "temperature": 0} | body
    headers = auth(key) if key else {}
    return httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=60)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer sk-ls-not-a-key"}, "invalid_api_key"),
        ({"Authorization": "Basic c2stbHM="}, "missing_api_key"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/models", "/v1/completions", "/v1/chat/completions"])
def test_requests_without_a_valid_key_get_401(secure, headers, code, path):
    if path == "/v1/models":
        response = httpx.get(f"{secure.url}{path}", headers=headers)
    else:  # an invalid body too: authentication comes before parsing
        response = httpx.post(f"{secure.url}{path}", content=b"{not json", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert error_of(response)["code"] == code


def test_probes_need_no_key(secure):
    assert httpx.get(f"{secure.url}/health").status_code == 200


@pytest.mark.parametrize(
    ("key", "visible"),
    [
        ("hospital", {"code", "medical"}),
        ("lawfirm", {"code", "legal"}),
        ("public", {"code"}),
        ("admin", {"code", "legal", "medical"}),
    ],
)
def test_models_lists_only_what_the_key_may_use(secure, key, visible):
    response = httpx.get(f"{secure.url}/v1/models", headers=auth(key))
    assert response.status_code == 200
    assert {m["id"] for m in response.json()["data"]} == visible | {secure.base_model}


def test_other_tenants_adapter_is_indistinguishable_from_an_unknown_one(secure):
    hidden = complete(secure, "hospital", model="legal")
    unknown = complete(secure, "hospital", model="no-such-adapter")
    assert hidden.status_code == unknown.status_code == 404
    # The same body, name for name: nothing tells "exists but not yours" from "does not exist".
    assert hidden.json() == json.loads(unknown.text.replace("no-such-adapter", "legal"))
    assert "legal" not in error_of(hidden)["message"].replace("'legal'", "")
    own = complete(secure, "lawfirm", model="legal")
    assert own.status_code == 200, own.text


def test_chat_respects_tenants_too(secure):
    body = {"model": "medical", "messages": [{"role": "user", "content": "fever?"}], "max_tokens": 2}
    denied = httpx.post(f"{secure.url}/v1/chat/completions", json=body, headers=auth("lawfirm"), timeout=60)
    allowed = httpx.post(f"{secure.url}/v1/chat/completions", json=body, headers=auth("hospital"), timeout=60)
    assert denied.status_code == 404 and error_of(denied)["code"] == "model_not_found"
    assert allowed.status_code == 200, allowed.text


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"max_tokens": LIMITS["max_tokens"] + 1}, 400, "invalid_request", "max_tokens"),
        ({"n": LIMITS["max_n"] + 1}, 400, "invalid_request", "n"),
        ({"prompt": "word " * 400}, 400, "context_length_exceeded", "prompt"),
        ({"max_tokens": "many"}, 400, "invalid_request", "max_tokens"),
    ],
)
def test_token_and_choice_limits(secure, body, status, code, param):
    response = complete(secure, "public", **body)
    assert response.status_code == status
    error = error_of(response)
    assert (error["code"], error["param"]) == (code, param)


def test_oversized_bodies_get_413_declared_or_chunked(secure):
    big = {"model": secure.base_model, "prompt": "x" * (MAX_BODY + 1)}
    declared = httpx.post(f"{secure.url}/v1/completions", json=big, headers=auth("public"))
    assert declared.status_code == 413 and error_of(declared)["code"] == "payload_too_large"
    assert str(MAX_BODY) in error_of(declared)["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server must count
        payload = json.dumps(big).encode()
        for start in range(0, len(payload), 8192):
            yield payload[start : start + 8192]

    chunked = httpx.post(f"{secure.url}/v1/completions", content=chunks(), headers=auth("public"))
    assert chunked.status_code == 413
    assert complete(secure, "public").status_code == 200  # and the server goes on


def test_rate_limit_hit_and_recovery(secure):
    statuses = [complete(secure, "burst").status_code for _ in range(RATE_BURST)]
    assert statuses == [200] * RATE_BURST
    limited = complete(secure, "burst")
    assert limited.status_code == 429
    assert error_of(limited)["code"] == "rate_limit_exceeded"
    retry_after = int(limited.headers["retry-after"])
    assert 1 <= retry_after <= 2
    assert complete(secure, "public").status_code == 200  # other keys are not affected
    time.sleep(retry_after)
    assert complete(secure, "burst").status_code == 200


@asynccontextmanager
async def _held(server: RunningServer, keys: list[str]) -> AsyncIterator[list[httpx.Response]]:
    """One long streamed request per entry of ``keys``, all at once; the answers (200: admitted, or the refusal)
    once each has one. Every admitted request holds its slots until the block ends: then the connections close,
    the server aborts the requests (each could generate 1000 tokens) and lets their slots go."""
    body = {"model": server.base_model, "prompt": "Tell me", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(timeout=300) as client, AsyncExitStack() as streams:

        async def send(key: str) -> httpx.Response:
            request = client.stream("POST", f"{server.url}/v1/completions", json=body, headers=auth(key))
            response = await streams.enter_async_context(request)
            if response.status_code != 200:
                await response.aread()  # the error body, for error_of
            return response

        yield list(await asyncio.gather(*(send(key) for key in keys)))


def _until_admitted(server: RunningServer, keys: list[str]) -> None:
    """Slots come back when requests end: each key's next request for all its slots (as many prompts as the
    per-key bound) is admitted once the server has seen the held requests close (429 or 503 until then),
    within a deadline; so every slot they held is free for the next test."""
    deadline = time.monotonic() + 30
    every_slot = ["The patient"] * PER_KEY_CONCURRENCY
    for key in keys:
        while (status := complete(server, key, prompt=every_slot).status_code) in (429, 503):
            assert time.monotonic() < deadline, f"{key}: still {status} 30 s after the held requests ended"
            time.sleep(0.05)
        assert status == 200, (key, status)


async def test_concurrency_per_key(secure):
    async with _held(secure, ["busy1"] * (PER_KEY_CONCURRENCY + 2)) as responses:
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) >= PER_KEY_CONCURRENCY and 429 in statuses, statuses
        for response in responses:
            if response.status_code == 429:
                assert error_of(response)["code"] == "concurrency_limit_exceeded"
                assert response.headers["retry-after"] == "1"
    _until_admitted(secure, ["busy1"])


async def test_server_wide_queue_bound_gives_503(secure):
    # Two requests per key stay within the per-key bound; six exceed the 4 engine slots (no queue).
    async with _held(secure, ["busy1", "busy2", "busy3"] * PER_KEY_CONCURRENCY) as responses:
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) == ENGINE_SLOTS and set(statuses) == {200, 503}, statuses
        for response in responses:
            if response.status_code == 503:
                assert error_of(response)["code"] == "server_overloaded"
                assert response.headers["retry-after"] == "1"
    _until_admitted(secure, ["busy1", "busy2", "busy3"])


def denials(server: RunningServer) -> dict[tuple[str, str], float]:
    """(series, label) -> value of the denied and limited request counters, read with an admin key."""
    metrics = httpx.get(f"{server.url}/metrics", headers=auth("admin")).text  # needs a metrics or admin key
    found = re.finditer(r'^(loraserve_(?:denied|limited)_requests)_total\{[a-z]+="(\w+)"\} (\S+)$', metrics, re.M)
    return {(match[1], match[2]): float(match[3]) for match in found}


def test_denials_are_counted_and_logged_without_the_key(secure):
    before = denials(secure)
    wrong = "sk-ls-wrong-" + new_key()
    assert httpx.get(f"{secure.url}/v1/models", headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
    assert httpx.get(f"{secure.url}/v1/models").status_code == 401
    assert [complete(secure, "counted").status_code for _ in range(RATE_BURST + 1)][-1] == 429
    huge = {"model": secure.base_model, "prompt": "x" * MAX_BODY}
    assert httpx.post(f"{secure.url}/v1/completions", json=huge, headers=auth("public")).status_code == 413
    after = denials(secure)
    changed = {
        series: after[series] - before.get(series, 0.0) for series in after if after[series] != before.get(series)
    }
    assert changed == {
        ("loraserve_denied_requests", "invalid_key"): 1.0,
        ("loraserve_denied_requests", "missing_key"): 1.0,
        ("loraserve_limited_requests", "rate"): 1.0,
        ("loraserve_limited_requests", "body_size"): 1.0,
    }
    log = secure.log()
    assert "invalid_key" in log
    assert wrong not in log and not any(key in log for key in KEYS.values())


@pytest.mark.parametrize(("key", "status"), [(None, 401), ("hospital", 403), ("admin", 200)])
def test_admin_endpoints_need_the_admin_role(secure, key, status):
    headers = auth(key) if key else {}
    response = httpx.get(f"{secure.url}/admin/routes", headers=headers)
    assert response.status_code == status
    if status == 403:
        assert error_of(response)["code"] == "permission_denied"
    if status != 200:  # and no change gets through either
        change = httpx.delete(f"{secure.url}/admin/routes/legal", headers=headers)
        assert change.status_code == status


def test_auto_routing_only_considers_the_keys_adapters(secure):
    body = {
        "model": "auto",
        "messages": [{"role": "user", "content": "Can my landlord keep my security deposit under the lease?"}],
        "max_tokens": 2,
    }

    def routed(key: str) -> str:
        response = httpx.post(f"{secure.url}/v1/chat/completions", json=body, headers=auth(key), timeout=60)
        assert response.status_code == 200, response.text
        return response.headers["x-routed-adapter"]

    assert routed("lawfirm") == "legal"
    assert routed("hospital") != "legal"  # the hospital's key never lands on the law firm's adapter


def register(server: RunningServer, key: str, name: str, source: Path, **body) -> httpx.Response:
    body = {"name": name, "source": str(source)} | body
    return httpx.post(f"{server.url}/v1/adapters", json=body, headers=auth(key), timeout=300)


def test_adapters_registered_for_a_tenant_are_that_tenants_alone(secure, demo_assets):
    volume = Path(secure.config["store"]["sources"][0]["roots"][0])
    triage, nope = unique("triage"), unique("nope")
    source = copy_adapter(demo_assets.adapters["medical"], volume / triage, scale=0.8)
    denied = register(secure, "hospital", triage, source, tenant="hospital")
    assert denied.status_code == 403 and error_of(denied)["code"] == "permission_denied"
    created = register(secure, "admin", triage, source, tenant="hospital")
    assert created.status_code == 201, created.text
    assert created.json()["info"]["tags"] == {}  # the owner is the name's, not a version tag
    shown = httpx.get(f"{secure.url}/v1/adapters/{triage}", headers=auth("admin"))
    assert shown.json()["tenant"] == "hospital"

    assert complete(secure, "hospital", model=triage).status_code == 200
    hidden, unknown = complete(secure, "lawfirm", model=triage), complete(secure, "lawfirm", model=nope)
    assert hidden.status_code == unknown.status_code == 404
    assert hidden.json() == json.loads(unknown.text.replace(nope, triage))
    models = {m["id"] for m in httpx.get(f"{secure.url}/v1/models", headers=auth("lawfirm")).json()["data"]}
    assert triage not in models
    health = {
        k: httpx.get(f"{secure.url}/v1/adapters/{triage}/health", headers=auth(k)) for k in ("hospital", "lawfirm")
    }
    assert health["hospital"].status_code == 200 and health["hospital"].json()["state"] == "ok"
    nobody = httpx.get(f"{secure.url}/v1/adapters/{nope}/health", headers=auth("lawfirm"))
    assert health["lawfirm"].status_code == nobody.status_code == 404
    assert health["lawfirm"].json() == json.loads(nobody.text.replace(nope, triage))


def test_traversal_and_pickle_are_refused_through_the_server(secure, demo_assets, tmp_path):
    volume = Path(secure.config["store"]["sources"][0]["roots"][0])
    escape, pickled_name = unique("escape"), unique("pickled")
    outside = copy_adapter(demo_assets.adapters["code"], tmp_path / "outside")
    (volume / escape).symlink_to(outside)
    for source in (volume / ".." / "outside", outside, volume / escape):
        response = register(secure, "admin", escape, source)
        assert response.status_code == 400 and error_of(response)["code"] == "source_refused", response.text
    pickled = broken_adapter(demo_assets.adapters["code"], volume / pickled_name, "pickle_weights")
    response = register(secure, "admin", pickled_name, pickled)
    assert response.status_code == 400 and error_of(response)["code"] == "pickle_weights"
    names = {a["name"] for a in httpx.get(f"{secure.url}/v1/adapters", headers=auth("admin")).json()["data"]}
    assert not names & {escape, pickled_name}


def test_named_fallback_answers_for_a_corrupt_adapter(secure, demo_assets):
    volume = Path(secure.config["store"]["sources"][0]["roots"][0])
    brittle = unique("brittle")
    source = copy_adapter(demo_assets.adapters["legal"], volume / brittle, scale=1.3)
    created = register(secure, "admin", brittle, source)
    assert created.status_code == 201, created.text
    digest = created.json()["info"]["version"]
    code_text = complete(secure, "public", model="code", max_tokens=8).json()["choices"][0]["text"]
    store_root = Path(secure.config["store"]["root"])
    for weights in (store_root / "cache" / digest / WEIGHTS, source / WEIGHTS):
        weights.write_bytes(b"\0" * weights.stat().st_size)  # same size, other bytes: only the checksum knows
    expected = {
        m: complete(secure, "admin", model=m, max_tokens=8).json()["choices"][0]["text"] for m in ("legal", "medical")
    }

    async def at_once() -> list[httpx.Response]:  # four keys, four engine slots: nothing queues or is refused
        calls = [("public", brittle), ("admin", brittle), ("lawfirm", "legal"), ("hospital", "medical")]
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{secure.url}/v1/completions",
                        json={"model": model, "prompt": "The patient", "max_tokens": 8, "temperature": 0},
                        headers=auth(key),
                    )
                    for key, model in calls
                )
            )

    fallback1, fallback2, legal, medical = asyncio.run(at_once())
    for response in (fallback1, fallback2):
        assert response.status_code == 200, response.text
        assert response.headers["X-Adapter-Fallback"] == "code"
        assert response.headers["X-Adapter-Fallback-Reason"] == "checksum_mismatch"
        assert response.json()["choices"][0]["text"] == code_text
    for model, response in (("legal", legal), ("medical", medical)):
        assert "X-Adapter-Fallback" not in response.headers
        assert response.json()["choices"][0]["text"] == expected[model]


@pytest.fixture
def new_route(secure) -> Iterator[str]:
    """A route name of this test's own, deleted afterwards: the shared server's routing is as it was."""
    name = unique("firm-intake")
    yield name
    httpx.delete(f"{secure.url}/admin/routes/{name}", headers=auth("admin"))


def test_a_tenants_route_routes_only_that_tenants_keys(secure, new_route):
    route = {"adapter": "code", "tenant": "lawfirm", "keywords": [{"patterns": ["zorblax"]}]}
    denied = httpx.put(f"{secure.url}/admin/routes/{new_route}", json=route, headers=auth("lawfirm"))
    assert denied.status_code == 403
    created = httpx.put(f"{secure.url}/admin/routes/{new_route}", json=route, headers=auth("admin"))
    assert created.status_code == 201, created.text
    assert created.json()["tenant"] == "lawfirm"
    body = {"model": "auto", "prompt": "a zorblax question", "max_tokens": 2}
    routed = {
        key: httpx.post(f"{secure.url}/v1/completions", json=body, headers=auth(key), timeout=60)
        for key in ("lawfirm", "hospital")
    }
    assert routed["lawfirm"].headers["x-routed-adapter"] == "code"
    assert routed["lawfirm"].headers["x-route-method"] == "keyword"
    assert routed["hospital"].headers["x-route-method"] != "keyword"
