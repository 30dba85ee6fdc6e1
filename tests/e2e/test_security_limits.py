"""Limits that count work, checked sampling values and safe uploads, through the real server.

The shared ``limited`` server (tests/e2e/conftest.py; issue #13 findings 5 and
7). Each test uses its own keys, so one test's buckets and counters never touch
another's, and counters are compared before and after. Uploads are
sent over raw sockets where the test must see the answer before the body is
complete: a client library would finish sending first.
"""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import RunningServer
from tests.e2e.conftest import LIMITED_LIMITS as LIMITS
from tests.e2e.conftest import keys_of

pytestmark = pytest.mark.engine

KEYS = keys_of("limits")
MiB = 1 << 20
UPLOAD_LIMIT = 64 * MiB  # limits.max_upload_bytes (the default)


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def complete(server: RunningServer, key: str, **body) -> httpx.Response:
    body = {"model": server.base_model, "prompt": "The patient", "max_tokens": 2, "temperature": 0.5} | body
    headers = auth(key) | {"Content-Type": "application/json"}  # json.dumps, unlike httpx, writes NaN and Infinity
    return httpx.post(f"{server.url}/v1/completions", content=json.dumps(body), headers=headers, timeout=120)


def chat(server: RunningServer, key: str, **body) -> httpx.Response:
    body = {"model": server.base_model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2} | body
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=auth(key), timeout=120)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def metric(server: RunningServer, name: str, label: str) -> float:
    response = httpx.get(f"{server.url}/metrics", headers=auth("admin"))  # /metrics needs a metrics or admin key
    assert response.status_code == 200, response.text
    text = response.text
    match = re.search(rf'^{name}_total\{{[a-z]+="{label}"\}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


# -- prompts per request, cost in sequences (finding 5) -----------------------------------


@pytest.mark.parametrize("count", [LIMITS["max_prompts_per_request"] + 1, 2049])
def test_more_prompts_than_allowed_is_a_400_naming_prompt(limited, count):
    response = complete(limited, "user", prompt=["Hello"] * count)
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == "prompt"
    if count <= 2048:  # the configured limit; beyond the API's own cap the request model refuses it
        assert "limits.max_prompts_per_request" in error["message"] and f"{count} prompts" in error["message"]
    within = complete(limited, "user", prompt=["Hello"] * LIMITS["max_prompts_per_request"])
    assert within.status_code == 200 and len(within.json()["choices"]) == LIMITS["max_prompts_per_request"]


def test_the_rate_is_charged_by_prompts_times_n(limited):
    # 2 prompts x n=2 = 4 sequences: the whole burst of 4 in one request.
    full = complete(limited, "cost", prompt=["Hello", "World"], n=2)
    assert full.status_code == 200 and len(full.json()["choices"]) == 4
    limited_response = complete(limited, "cost")
    assert limited_response.status_code == 429
    error = error_of(limited_response)
    assert error["code"] == "rate_limit_exceeded" and "burst 4" in error["message"] and "needs 1" in error["message"]
    assert int(limited_response.headers["retry-after"]) >= 1
    # The same number of requests, each of one sequence, stay within the same bucket.
    assert [complete(limited, "single").status_code for _ in range(2)] == [200, 200]
    # More sequences than the burst can never be admitted: a 400, not a retry.
    never = complete(limited, "single", prompt=["a", "b", "c"], n=2)
    assert never.status_code == 400
    assert error_of(never)["param"] == "n" and "limits.rate.burst" in error_of(never)["message"]


def test_the_server_wide_bound_counts_sequences(limited):
    too_many = complete(limited, "user", prompt=["a", "b", "c"], n=3)  # 9 sequences, 6 slots, no queue
    assert too_many.status_code == 400
    assert "engine.max_num_seqs plus limits.max_queued_requests" in error_of(too_many)["message"]
    before = metric(limited, "loraserve_limited_requests", "queue")
    body = {"model": limited.base_model, "prompt": ["Tell me", "Go on"], "n": 2, "max_tokens": 1000}
    body |= {"ignore_eos": True, "stream": True}
    with (
        httpx.Client(timeout=120) as client,
        client.stream("POST", f"{limited.url}/v1/completions", json=body, headers=auth("holder")) as held,
    ):
        assert held.status_code == 200
        lines = held.iter_lines()  # kept: a dropped iterator closes the connection, and the server lets go
        assert next(lines).startswith("data: ")  # 4 sequences are generating now
        # One more request: two requests in all, but 4 + 3 sequences exceed the 6 slots.
        busy = complete(limited, "other", n=3)
        assert busy.status_code == 503, busy.text
        assert error_of(busy)["code"] == "server_overloaded" and busy.headers["retry-after"] == "1"
        assert complete(limited, "other", n=2).status_code == 200  # 4 + 2 fits
    assert metric(limited, "loraserve_limited_requests", "queue") == before + 1


# -- stop strings and sampling values (finding 5) -----------------------------------------


@pytest.mark.parametrize(
    ("stop", "message"),
    [
        (["a", "b", "c", "d", "e"], "limits.max_stop"),
        ("x" * 33, "limits.max_stop_chars"),
        (["x"] * 65, "at most 64 stop strings"),
        ("y" * 1025, "at most 1024 characters"),
    ],
)
def test_too_many_or_too_long_stop_strings_are_a_400(limited, stop, message):
    for response in (complete(limited, "user", stop=stop), chat(limited, "user", stop=stop)):
        assert response.status_code == 400
        error = error_of(response)
        assert error["param"] == "stop" and message in error["message"], error


BAD_VALUES: list[tuple[dict[str, Any], str]] = [
    ({"seed": 2**64}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"top_k": -5}, "top_k"),
    ({"top_k": 2**31}, "top_k"),
    ({"top_k": 10**30}, "top_k"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"min_tokens": 5000, "max_tokens": None}, "min_tokens"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"temperature": float("nan")}, "temperature"),
    ({"stop": [""]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"prompt": [-1, 5]}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": [[5], [2**63]]}, "prompt"),
    ({"max_tokens": 10**30}, "max_tokens"),
    ({"n": 2, "temperature": 0}, "n"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_VALUES, ids=[json.dumps(f) for f, _ in BAD_VALUES])
def test_values_the_engine_refuses_are_a_400_naming_the_field(limited, fields, param):
    response = complete(limited, "params", **fields)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == param
    assert httpx.get(f"{limited.url}/health").status_code == 200


def test_chat_values_the_engine_refuses_are_a_400_too(limited):
    response = chat(limited, "params", min_tokens=3, max_completion_tokens=2)
    assert response.status_code == 400 and error_of(response)["param"] == "min_tokens"
    response = chat(limited, "params", seed=2**64)
    assert response.status_code == 400 and error_of(response)["param"] == "seed"


def test_the_engine_still_serves_after_the_refused_values(limited):
    for fields, _ in BAD_VALUES:
        complete(limited, "params", **fields)
    assert httpx.get(f"{limited.url}/health").status_code == 200
    edge = complete(limited, "params", seed=2**63 - 1, top_k=2**31 - 1, min_tokens=2, temperature=1.0, n=3)
    assert edge.status_code == 200 and len(edge.json()["choices"]) == 3
    assert "unhandled error" not in limited.log()


# -- uploads (finding 7) --------------------------------------------------------------------


def _connect(server: RunningServer) -> socket.socket:
    url = urlsplit(server.url)
    return socket.create_connection((url.hostname, url.port), timeout=30)


def _head(path: str, key: str, extra: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", f"Authorization: Bearer {KEYS[key]}"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _response(sock: socket.socket, timeout: float) -> tuple[int, dict]:
    """Status and JSON body of the answer, read within ``timeout`` seconds."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    declared = re.search(rb"content-length: (\d+)", head, re.I)
    assert declared, head
    length = int(declared[1])
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), json.loads(body[:length])


BOUNDARY = "limitsboundary"
PART_HEAD = (
    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="adapter_model.safetensors"\r\n'
    "Content-Type: application/octet-stream\r\n\r\n"
).encode()
MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_user_upload_is_refused_before_its_body_is_read(limited, framing):
    total = 5 * MiB
    before = metric(limited, "loraserve_denied_requests", "not_admin")
    first = PART_HEAD + b"\0" * (64 * 1024)
    if framing == "content-length":
        extra = MULTIPART | {"Content-Length": str(total)}
    else:
        extra, first = MULTIPART | {"Transfer-Encoding": "chunked"}, _chunk(first)
    with _connect(limited) as sock:
        started = time.monotonic()
        sock.sendall(_head("/v1/adapters/sneaky/versions", "user", extra) + first)
        # Only 64 KiB of the 5 MiB are sent, and no more will be: the answer can only come if the
        # server decided without the body.
        status, body = _response(sock, timeout=10)
    assert status == 403 and body["error"]["code"] == "permission_denied"
    assert time.monotonic() - started < 10
    assert metric(limited, "loraserve_denied_requests", "not_admin") == before + 1
    assert "sneaky" not in httpx.get(f"{limited.url}/v1/adapters", headers=auth("admin")).text


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert rss, status
    return int(rss[1])


def test_an_admin_upload_streams_and_stops_at_the_limit_without_leftovers(limited):
    staging = Path(limited.config["store"]["root"]) / "staging"
    pid = limited.process.pid
    baseline = _rss_kib(pid)
    block = b"\0" * MiB
    with _connect(limited) as sock:
        sock.sendall(_head("/v1/adapters/huge/versions", "admin", MULTIPART | {"Transfer-Encoding": "chunked"}))
        sock.sendall(_chunk(PART_HEAD))
        for _ in range(48):  # 48 MiB, no Content-Length: the server cannot know the size in advance
            sock.sendall(_chunk(block))
        # The server has taken in all but what the socket buffers hold; a buffered body would be ~48 MiB of it.
        grown = 0
        for _ in range(5):
            time.sleep(0.2)
            grown = max(grown, _rss_kib(pid) - baseline)
        for _ in range(UPLOAD_LIMIT // MiB - 48):
            sock.sendall(_chunk(block))
        sock.sendall(_chunk(block[: 64 * 1024]))  # just over the limit, and no more
        status, body = _response(sock, timeout=30)
    assert status == 413 and body["error"]["code"] == "payload_too_large"
    assert "limits.max_upload_bytes" in body["error"]["message"]
    assert grown < 24 * 1024, f"the server grew by {grown} KiB while receiving 48 MiB"
    assert [p for p in staging.rglob("*")] == []
    assert "huge" not in httpx.get(f"{limited.url}/v1/adapters", headers=auth("admin")).text


def test_uploads_are_rate_limited_per_key(limited):
    before = metric(limited, "loraserve_limited_requests", "upload_rate")
    url = f"{limited.url}/v1/adapters/ratelimited/versions"
    statuses = []
    for _ in range(LIMITS["upload_rate"]["burst"]):  # no files: a 400, but each attempt takes a token
        statuses.append(httpx.post(url, files={"tenant": (None, "t")}, headers=auth("uploader")).status_code)
    assert statuses == [400] * LIMITS["upload_rate"]["burst"]
    refused = httpx.post(url, files={"tenant": (None, "t")}, headers=auth("uploader"))
    assert refused.status_code == 429
    assert error_of(refused)["code"] == "rate_limit_exceeded" and "limits.upload_rate" in error_of(refused)["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert metric(limited, "loraserve_limited_requests", "upload_rate") == before + 1
    # Another admin key has its own bucket.
    other = httpx.post(url, files={"tenant": (None, "t")}, headers=auth("admin"))
    assert other.status_code == 400 and error_of(other)["param"] == "files"
