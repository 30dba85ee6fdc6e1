"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis) against the real server, with API keys.

The ``secure`` session server (tests/e2e/conftest.py: API keys, tenants,
limits, a store with a local source, run-time routes), fuzzed as a user key and
as an admin key of this module's own. Every generated request, valid or not,
must get a non-5xx answer within the timeout, every error must be in the one
error shape, a user key must never get through to an admin operation (403 for
every valid request), and the server must still be healthy and serving
afterwards, with no traceback in its log. The fuzzing changes
routes and adapters at random, which no other module may see: this module is
one of ``SERVER_ENDERS`` (tests/conftest.py), so it runs after every other
test of the run, its server's included. Valid requests stay short: a generated
``max_tokens`` (or ``max_completion_tokens``) over ``FUZZ_MAX_TOKENS`` but within the
server's ``limits.max_tokens`` is sent as ``FUZZ_MAX_TOKENS``; one over the limit
(a 400) and every other field go as generated.

Open mode is not fuzzed separately: there every caller is the admin principal,
which the admin key's runs exercise on the same code.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.conftest import RunningServer
from tests.e2e.conftest import SECURE_LIMITS, keys_of

pytestmark = pytest.mark.engine

CALL_TIMEOUT_S = 60
FUZZ_MAX_TOKENS = 8
KEYS = keys_of("fuzz")  # role -> key: "user" and "admin"


@pytest.fixture(scope="module")
def api_schema(secure: RunningServer):
    return schemathesis.openapi.from_url(f"{secure.url}/openapi.json")


def short(case: schemathesis.Case) -> schemathesis.Case:
    """``case`` with an integer ``max_tokens``/``max_completion_tokens`` the server would accept but that is over
    ``FUZZ_MAX_TOKENS`` lowered to it; values over the server's limit go as generated (refused without work)."""
    if isinstance(case.body, dict):
        for field in ("max_tokens", "max_completion_tokens"):
            value = case.body.get(field)
            if type(value) is int and FUZZ_MAX_TOKENS < value <= SECURE_LIMITS["max_tokens"]:
                case.body[field] = FUZZ_MAX_TOKENS
    return case


def auth(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[role]}"}


# Every operation of the schema is fuzzed; test_every_operation_is_fuzzed keeps this list complete as the API grows.
# Operations without inputs have no invalid requests to generate: positive cases only. `examples` is for the role
# the operation is for (admin operations: the admin key; the rest: the user key); the other role gets
# ROLE_CHECK_EXAMPLES, enough to show what it is allowed or refused.
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
ROLE_CHECK_EXAMPLES = 5
CASES = [
    ("GET /health", POSITIVE, 5),
    ("GET /metrics", POSITIVE, 3),
    ("GET /v1/models", POSITIVE, 5),
    ("POST /v1/completions", POSITIVE, 40),
    ("POST /v1/completions", NEGATIVE, 40),
    ("POST /v1/chat/completions", POSITIVE, 40),
    ("POST /v1/chat/completions", NEGATIVE, 40),
    # the runtime routes API; this server's own routes change
    ("GET /admin/routes", POSITIVE, 5),
    ("PUT /admin/routes/{name}", POSITIVE, 25),
    ("PUT /admin/routes/{name}", NEGATIVE, 25),
    ("DELETE /admin/routes/{name}", POSITIVE, 10),
    ("DELETE /admin/routes/{name}", NEGATIVE, 10),
    # the adapter store's admin API; the configured adapters are pinned
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
# What a user key may not do: every operation of the two admin APIs except an adapter's health (its own adapters'),
# and /metrics (metrics and admin keys only).
USER_IS_REFUSED = {
    label
    for label in OPERATIONS
    if label.split()[1].startswith(("/admin/", "/v1/adapters")) and label != "GET /v1/adapters/{ref}/health"
} | {"GET /metrics"}


def _examples(role: str, label: str, examples: int) -> int:
    """``examples`` for the role the operation is for, a role check's worth for the other."""
    meant_for = "admin" if label in USER_IS_REFUSED else "user"
    return examples if role == meant_for else min(examples, ROLE_CHECK_EXAMPLES)


ROLE_CASES = [
    (role, label, mode, _examples(role, label, examples))
    for role in ("user", "admin")
    for label, mode, examples in CASES
]


def test_every_operation_is_fuzzed(api_schema):
    assert {result.ok().label for result in api_schema.get_all_operations()} == OPERATIONS


@pytest.mark.parametrize(
    ("role", "label", "mode", "examples"), ROLE_CASES, ids=[f"{c[0]}-{c[1]}-{c[2].value}" for c in ROLE_CASES]
)
def test_no_server_errors(api_schema, secure, role, label, mode, examples):
    operation = api_schema.find_operation_by_label(label)
    refused = role == "user" and label in USER_IS_REFUSED

    @given(case=operation.as_strategy(generation_mode=mode).map(short))
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case) -> None:
        response = case.call(headers=auth(role), timeout=CALL_TIMEOUT_S)
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert {"message", "type", "param", "code"} <= set(error), response.text
        if refused:  # never through; a valid request is refused for its role (an invalid one may be a 400 first)
            assert response.status_code >= 400, (case.method, case.path, response.text[:500])
            if mode is POSITIVE:
                assert (response.status_code, error["code"]) == (403, "permission_denied"), response.text

    check()
    assert httpx.get(f"{secure.url}/health", timeout=10).status_code == 200


def test_still_healthy_and_serving_after_fuzzing(secure):
    assert httpx.get(f"{secure.url}/health", timeout=10).status_code == 200
    for role in KEYS:
        response = httpx.post(
            f"{secure.url}/v1/completions",
            json={"model": "code", "prompt": "def f():", "max_tokens": 4, "ignore_eos": True},
            headers=auth(role),
            timeout=CALL_TIMEOUT_S,
        )
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4
    assert "Traceback" not in secure.log()
