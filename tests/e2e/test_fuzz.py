"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis) against the real server.

Every generated request, valid or not, must get a non-5xx answer within the
timeout, every error must be in the one error shape, and the server must still
be healthy and serving afterwards. Tight limits keep valid requests short.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.conftest import RunningServer, demo_config, start_server, stop_server

CALL_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def fuzz_server(demo_assets, tmp_path_factory) -> Iterator[RunningServer]:
    config = demo_config(demo_assets)
    config["limits"] = {"max_tokens": 8, "max_n": 2, "max_body_bytes": 65536, "max_upload_bytes": 65536}
    config["store"] = {"root": str(tmp_path_factory.mktemp("fuzz-store")), "pinned": ["code", "legal", "medical"]}
    running = start_server(config, tmp_path_factory.mktemp("fuzz"))
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


# Every operation of the schema except /metrics (plain text, no input) is fuzzed;
# test_every_operation_is_fuzzed keeps this list complete as the API grows.
# Operations without inputs have no invalid requests to generate: positive cases only.
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
CASES = [
    ("GET /health", POSITIVE, 5),
    ("GET /v1/models", POSITIVE, 5),
    ("POST /v1/completions", POSITIVE, 40),
    ("POST /v1/completions", NEGATIVE, 40),
    ("POST /v1/chat/completions", POSITIVE, 40),
    ("POST /v1/chat/completions", NEGATIVE, 40),
    # the runtime routes API (open mode: every caller is an admin); this server's own routes change
    ("GET /admin/routes", POSITIVE, 5),
    ("PUT /admin/routes/{name}", POSITIVE, 25),
    ("PUT /admin/routes/{name}", NEGATIVE, 25),
    ("DELETE /admin/routes/{name}", POSITIVE, 10),
    ("DELETE /admin/routes/{name}", NEGATIVE, 10),
    # the adapter store's admin API (every caller is an admin here); the configured adapters are pinned
    ("GET /v1/adapters", POSITIVE, 3),
    ("POST /v1/adapters", POSITIVE, 15),
    ("POST /v1/adapters", NEGATIVE, 15),
    ("POST /v1/adapters/{name}/versions", POSITIVE, 10),
    ("POST /v1/adapters/{name}/versions", NEGATIVE, 10),
    ("GET /v1/adapters/{name}", POSITIVE, 5),
    ("GET /v1/adapters/{name}", NEGATIVE, 5),
    ("PUT /v1/adapters/{name}/aliases/{alias}", POSITIVE, 10),
    ("PUT /v1/adapters/{name}/aliases/{alias}", NEGATIVE, 10),
    ("PUT /v1/adapters/{ref}/pin", POSITIVE, 5),
    ("PUT /v1/adapters/{ref}/pin", NEGATIVE, 5),
    ("DELETE /v1/adapters/{ref}/pin", POSITIVE, 5),
    ("DELETE /v1/adapters/{ref}/pin", NEGATIVE, 5),
    ("POST /v1/adapters/{ref}/unload", POSITIVE, 5),
    ("POST /v1/adapters/{ref}/unload", NEGATIVE, 5),
    ("DELETE /v1/adapters/{ref}", POSITIVE, 5),
    ("DELETE /v1/adapters/{ref}", NEGATIVE, 5),
    ("GET /v1/adapters/{ref}/health", POSITIVE, 5),
    ("GET /v1/adapters/{ref}/health", NEGATIVE, 5),
    ("POST /v1/adapters/{ref}/health", POSITIVE, 5),
    ("POST /v1/adapters/{ref}/health", NEGATIVE, 5),
]
OPERATIONS = {label for label, _, _ in CASES}


def test_every_operation_is_fuzzed(api_schema):
    labels = {result.ok().label for result in api_schema.get_all_operations()}
    assert labels - {"GET /metrics"} == OPERATIONS


@pytest.mark.parametrize(("label", "mode", "examples"), CASES, ids=[f"{c[0]}-{c[1].value}" for c in CASES])
def test_no_server_errors(api_schema, fuzz_server, label, mode, examples):
    operation = api_schema.find_operation_by_label(label)

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def check(case) -> None:
        response = case.call(timeout=CALL_TIMEOUT_S)
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert {"message", "type", "param", "code"} <= set(error), response.text

    check()
    assert httpx.get(f"{fuzz_server.url}/health", timeout=10).status_code == 200


def test_still_healthy_and_serving_after_fuzzing(fuzz_server):
    assert httpx.get(f"{fuzz_server.url}/health", timeout=10).status_code == 200
    response = httpx.post(
        f"{fuzz_server.url}/v1/completions",
        json={"model": "code", "prompt": "def f():", "max_tokens": 4},
        timeout=CALL_TIMEOUT_S,
    )
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4
    assert "Traceback" not in fuzz_server.log()
