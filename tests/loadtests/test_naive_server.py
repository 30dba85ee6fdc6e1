"""The naive baseline of the benchmark speaks the API shape the load test sends, and really switches adapters."""

from __future__ import annotations

import json
import sys

import httpx
import pytest
import yaml

from loadtests.process import free_port, running_server
from tests.conftest import demo_config

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def naive_url(demo_assets, tmp_path_factory):
    work = tmp_path_factory.mktemp("naive")
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(demo_config(demo_assets)))
    port = free_port()
    command = [sys.executable, "-m", "loadtests.naive_server", "--config", str(config), "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with running_server(command, f"{url}/health", work / "naive.log", timeout_s=300):
        yield url


def complete(url: str, model: str) -> str:
    body = {"model": model, "prompt": "The patient", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200
    payload = response.json()
    assert payload["usage"]["completion_tokens"] == 12
    return payload["choices"][0]["text"]


def test_models_and_adapter_switching(naive_url) -> None:
    cards = httpx.get(f"{naive_url}/v1/models").json()["data"]
    assert [c["id"] for c in cards] == ["loraserve-demo-base", "code", "legal", "medical"]
    assert all(c["max_model_len"] == 1024 for c in cards)
    texts = {model: complete(naive_url, model) for model in ("loraserve-demo-base", "medical", "legal")}
    assert len(set(texts.values())) == 3, texts
    assert complete(naive_url, "loraserve-demo-base") == texts["loraserve-demo-base"]  # base after adapters


def test_streamed_chat_with_usage(naive_url) -> None:
    body = {"model": "code", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{naive_url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        data = [line[5:].strip() for line in response.iter_lines() if line.startswith("data:")]
    assert data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    assert sum(1 for e in events if e["choices"] and e["choices"][0]["finish_reason"] is None) == 6
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6
    response = httpx.post(f"{naive_url}/v1/completions", json={"model": "nope", "prompt": "x"})
    assert response.status_code == 404 and set(response.json()["error"]) == {"message", "type", "param", "code"}
