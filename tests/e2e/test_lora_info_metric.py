"""The Gateway API Inference Extension's endpoint picker reads `vllm:lora_requests_info`
from each pod's /metrics (deploy/k8s/components/inference-pool): our /metrics must
expose it in vLLM's format, and while an adapter's request runs, the newest sample
(the picker takes the one with the latest timestamp value) must name that adapter.
That sample's value is the time of the engine step it describes, so it must be
newer than the request's start: a sample left by an earlier request cannot pass."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.engine

LABELS = {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}


def lora_info_samples(server) -> list:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    family = families["vllm:lora_requests_info"]
    assert family.type == "gauge"
    return family.samples


def test_lora_requests_info_names_the_running_adapter(server) -> None:
    body = {"model": "code", "prompt": "def", "max_tokens": 400, "ignore_eos": True, "stream": True}
    started = time.time()
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # first token is out
        samples = lora_info_samples(server)
    assert samples
    for sample in samples:
        assert set(sample.labels) == LABELS
        assert sample.labels["max_lora"] == str(server.config["engine"]["max_loras"])
    newest = max(samples, key=lambda s: s.value)
    assert newest.value >= started, (newest, started)
    adapters = newest.labels["running_lora_adapters"].split(",") + newest.labels["waiting_lora_adapters"].split(",")
    assert "code" in adapters, newest
