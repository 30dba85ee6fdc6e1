"""/metrics (vLLM's own and per-adapter) and engine aborts on client disconnect."""

from __future__ import annotations

import re
import time

import httpx
import pytest


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
    httpx.post(f"{server.url}/v1/completions", json={"model": "legal", "prompt": "The", "max_tokens": 2}, timeout=60)
    text = scrape(server)
    assert "vllm:num_requests_running" in text
    assert "vllm:generation_tokens_total" in text
    # The Gateway API Inference Extension's endpoint picker reads this one, by adapter name.
    assert re.search(r'vllm:lora_requests_info\{[^}]*max_lora="2"', text)
    assert re.search(r'running_lora_adapters="[^"]*legal', text) or re.search(
        r'waiting_lora_adapters="[^"]*legal', text
    )


def wait_until_idle(server, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = metric(scrape(server), "vllm:num_requests_running")
        if running == 0:
            return running
        time.sleep(0.1)
    return running


def assert_engine_stopped(server, aborts_before: float, tokens_before: float, asked: int) -> None:
    assert wait_until_idle(server) == 0
    assert metric(scrape(server), "loraserve_request_aborts_total", adapter="code") == aborts_before + 1
    time.sleep(0.5)
    # Far fewer tokens than asked for were generated: the engine stopped the request.
    assert metric(scrape(server), "vllm:generation_tokens_total") - tokens_before < asked / 2


BODY = {"model": "code", "prompt": "The", "max_tokens": 900, "ignore_eos": True}


def test_disconnect_during_a_non_streaming_request_aborts_it(server) -> None:
    aborts = metric(scrape(server), "loraserve_request_aborts_total", adapter="code")
    tokens = metric(scrape(server), "vllm:generation_tokens_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=BODY, timeout=httpx.Timeout(5, read=0.5))
    assert_engine_stopped(server, aborts, tokens, BODY["max_tokens"])


def test_disconnect_during_a_stream_aborts_it(server) -> None:
    aborts = metric(scrape(server), "loraserve_request_aborts_total", adapter="code")
    tokens = metric(scrape(server), "vllm:generation_tokens_total")
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**BODY, "stream": True}, timeout=30) as response:
        events = (line for line in response.iter_lines() if line)
        for _ in range(3):
            assert next(events).startswith("data: ")
    assert_engine_stopped(server, aborts, tokens, BODY["max_tokens"])
