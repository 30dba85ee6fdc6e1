"""The Gateway API Inference Extension's endpoint picker reads `vllm:lora_requests_info`
from each pod's /metrics (deploy/k8s/components/inference-pool): our /metrics must
expose it in vLLM's format, and while an adapter's request runs, the newest sample
(the picker takes the one with the latest timestamp value) must name that adapter.
That sample's value is the time of the engine step it describes, so it must be
newer than the request's start: a sample left by an earlier request cannot pass.

Also here, on the same session server (``max_loras: 2``, three adapters): fairness across adapters
(``serving.lora_scheduler``). Two popular adapters flood both slots; the third adapter's requests must each
complete within a bound counted in flood requests, which no CPU noise changes; and the server's /metrics counts the
rule acting (``loraserve_fair_scheduler_*``, read in vLLM's engine-core process): more due requests, drains and held
requests after the flood than before it."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.config import EngineSettings

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


# Fairness. FLOOD_CLIENTS closed-loop clients per popular adapter, of staggered lengths (so one request of each is
# always running and neither slot frees by chance), and RARE_REQUESTS short requests of the third adapter, which
# younger flood requests pass while it has no slot. The bound, in flood requests finished before a rare one sent
# after it: the rule's engine.lora_max_overtakes; plus the step that makes it due (at most one admission per
# flood client); plus the drain, during which the other popular adapter keeps finishing requests (a drain takes
# at most the longest flood request, 44 tokens, in which its 8 clients finish about 13 requests: under one per
# flood client); plus REORDERED (requests sent within a moment may reach
# the engine in either order). A rare request is shorter than any flood request, so a flood request admitted
# after it cannot finish first. The flood stops once every rare request is done, or once one was overtaken
# beyond the bound: stock vLLM gets there (it let 93-94 pass with one slot), so the test fails about as fast.
FLOOD = ("legal", "medical")
FLOOD_CLIENTS = 8
RARE, RARE_REQUESTS, RARE_TOKENS = "code", 2, 8
REORDERED = 2


@dataclass
class Timed:
    started: float
    done: float = float("inf")


def timed_completion(client: httpx.Client, url: str, model: str, max_tokens: int) -> Timed:
    record = Timed(time.monotonic())
    body = {"model": model, "prompt": "def", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    response = client.post(f"{url}/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == max_tokens
    record.done = time.monotonic()
    return record


def overtaken(rare: Timed, flood: list[Timed]) -> int:
    """Flood requests sent after ``rare`` that finished before it."""
    return sum(f.started > rare.started and f.done < rare.done for f in list(flood))


FAIRNESS_COUNTERS = ("due_requests", "drains", "held_requests")


def fairness_counts(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return {name: samples[f"loraserve_fair_scheduler_{name}_total"] for name in FAIRNESS_COUNTERS}


def test_a_flooding_adapter_pair_does_not_starve_the_third(server) -> None:
    max_overtakes = EngineSettings.model_validate(server.config["engine"]).lora_max_overtakes
    assert max_overtakes is not None and server.config["engine"]["max_loras"] == len(FLOOD)
    before = fairness_counts(server)
    bound = max_overtakes + 2 * len(FLOOD) * FLOOD_CLIENTS + REORDERED
    stop = threading.Event()
    flood: list[Timed] = []
    rare: list[Timed] = [Timed(float("inf")) for _ in range(RARE_REQUESTS)]

    def flood_client(model: str, i: int) -> None:
        with httpx.Client() as client:
            while not stop.is_set():
                flood.append(timed_completion(client, server.url, model, 16 + 4 * i))

    def rare_request(i: int) -> None:
        rare[i] = Timed(time.monotonic())  # sent now: counts overtakes while it runs
        with httpx.Client() as client:
            rare[i] = timed_completion(client, server.url, RARE, RARE_TOKENS)

    clients = [(model, i) for model in FLOOD for i in range(FLOOD_CLIENTS)]
    with ThreadPoolExecutor(len(clients) + RARE_REQUESTS) as pool:
        flooding = [pool.submit(flood_client, model, i) for model, i in clients]
        try:
            deadline = time.monotonic() + 300
            while len(flood) < len(clients) and time.monotonic() < deadline:  # the flood is under way
                time.sleep(0.05)
            assert len(flood) >= len(clients), "the flood did not get going"
            sent = [pool.submit(rare_request, i) for i in range(RARE_REQUESTS)]
            while not all(r.done() for r in sent) and time.monotonic() < deadline:
                if max(overtaken(r, flood) for r in rare) > bound:
                    break
                time.sleep(0.05)
        finally:
            stop.set()
        for future in flooding:
            future.result()
    counts = [overtaken(r, flood) for r in rare]
    assert all(r.done < float("inf") for r in rare) and max(counts) <= bound, (counts, bound, len(flood))
    # The rare requests were overtaken past the limit (stock vLLM's 93-94 is above it), so the rule acted; the
    # counts reach /metrics within the residency poll (0.5 s while requests run, one last read after).
    deadline = time.monotonic() + 30
    after = fairness_counts(server)
    while not all(after[name] > before[name] for name in FAIRNESS_COUNTERS):
        assert time.monotonic() < deadline, (before, after)
        time.sleep(0.1)
        after = fairness_counts(server)
