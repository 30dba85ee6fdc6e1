"""/metrics (vLLM's own and per-adapter) and engine aborts on client disconnect.

Every metric is read before and after the action it counts: series earlier
tests created prove nothing. A disconnect happens while the engine is seen
running the request (polled from /metrics under a deadline), never after a
guessed delay.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
import pytest

pytestmark = pytest.mark.engine


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


def scrape(server) -> str:
    return httpx.get(f"{server.url}/metrics").text


def test_per_adapter_metrics_count_requests_tokens_and_latency(server) -> None:
    before = scrape(server)
    response = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "medical", "prompt": "The", "max_tokens": 5, "temperature": 0},
        timeout=60,
    ).json()
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("loraserve_requests_total", adapter="medical", endpoint="completions") == 1
    assert delta("loraserve_prompt_tokens_total", adapter="medical") == response["usage"]["prompt_tokens"]
    assert delta("loraserve_completion_tokens_total", adapter="medical") == 5
    assert delta("loraserve_time_to_first_token_seconds_count", adapter="medical") == 1
    assert delta("loraserve_e2e_request_latency_seconds_count", adapter="medical") == 1
    assert delta("loraserve_completion_tokens_total", adapter="code") == 0


def test_errors_are_counted(server) -> None:
    before = metric(scrape(server), "loraserve_request_errors_total", adapter="unknown", code="model_not_found")
    httpx.post(f"{server.url}/v1/completions", json={"model": "missing", "prompt": "x"})
    after = metric(scrape(server), "loraserve_request_errors_total", adapter="unknown", code="model_not_found")
    assert after == before + 1


def test_vllm_metrics_are_exposed(server) -> None:
    before, started = scrape(server), time.time()
    response = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "legal", "prompt": "The", "max_tokens": 2, "ignore_eos": True},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    text = scrape(server)
    assert "vllm:num_requests_running" in text
    assert metric(text, "vllm:generation_tokens_total") - metric(before, "vllm:generation_tokens_total") == 2
    # The Gateway API Inference Extension's endpoint picker reads this one, by adapter name; its value is the
    # time of the engine step it describes, so a sample naming legal from this request is newer than `started`.
    samples = re.findall(r"^vllm:lora_requests_info\{([^}]*)\} (\S+)$", text, re.MULTILINE)
    assert samples and all('max_lora="2"' in labels for labels, _ in samples)
    assert any(
        re.search(r'(running|waiting)_lora_adapters="[^"]*legal', labels) and float(value) >= started
        for labels, value in samples
    ), samples


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.05)


def assert_engine_stopped(server, aborts_before: float, tokens_before: float, asked: int) -> None:
    def stopped() -> bool:
        text = scrape(server)
        return (
            metric(text, "vllm:num_requests_running") == 0
            and metric(text, "loraserve_request_aborts_total", adapter="code") == aborts_before + 1
        )

    wait_for(stopped, "the engine idle with the request counted as aborted")
    # Far fewer tokens than asked for were generated: the engine stopped the request.
    assert metric(scrape(server), "vllm:generation_tokens_total") - tokens_before < asked / 2


ASKED = 900
BODY = {"model": "code", "prompt": "The", "max_tokens": ASKED, "ignore_eos": True}


def running_since(server, tokens_before: float) -> Callable[[], bool]:
    """The engine runs a request and has generated tokens since ``tokens_before``."""

    def check() -> bool:
        text = scrape(server)
        return (
            metric(text, "vllm:num_requests_running") >= 1
            and metric(text, "vllm:generation_tokens_total") > tokens_before
        )

    return check


def test_disconnect_during_a_non_streaming_request_aborts_it(server) -> None:
    aborts = metric(scrape(server), "loraserve_request_aborts_total", adapter="code")
    tokens = metric(scrape(server), "vllm:generation_tokens_total")
    url = urlsplit(server.url)
    body = json.dumps(BODY).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_for(running_since(server, tokens), "the engine running the request")
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(1)  # no answer yet: the client leaves while the request runs
    assert_engine_stopped(server, aborts, tokens, ASKED)


def test_disconnect_during_a_stream_aborts_it(server) -> None:
    aborts = metric(scrape(server), "loraserve_request_aborts_total", adapter="code")
    tokens = metric(scrape(server), "vllm:generation_tokens_total")
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**BODY, "stream": True}, timeout=30) as response:
        events = (line for line in response.iter_lines() if line)
        for _ in range(3):
            assert next(events).startswith("data: ")
        wait_for(running_since(server, tokens), "the engine running the request")
    assert_engine_stopped(server, aborts, tokens, ASKED)
