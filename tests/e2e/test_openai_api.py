"""The OpenAI-compatible API through a real server, with the official ``openai`` client.

Every test talks HTTP to ``loraserve serve`` running the real vLLM engine with
the demo base model and the code/legal/medical adapters.
"""

from __future__ import annotations

import os
import re
import socket
import time

import httpx
import openai
import pytest

from tests.conftest import OMP_BIND
from tests.e2e.faults import children, process_name

ADAPTERS = ("code", "legal", "medical")
CLIENT_POOL_EXPIRY_S = httpx.Limits().keepalive_expiry or 5.0  # httpx's default, which the openai SDK keeps

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_health_is_ok(server) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_the_start_up_heap_is_frozen_before_serving(server) -> None:
    """The lifespan takes vLLM's, torch's and the app's objects out of the collector's scans (``app.py``)."""
    frozen = re.search(r"froze (\d+) start-up objects", server.log())
    assert frozen is not None and int(frozen[1]) > 100_000  # the modules alone: hundreds of thousands


def test_the_model_runs_in_the_engine_core_process_on_its_cores(server) -> None:
    """One engine process, no worker process beside it (``serving.cpu_executor``), its model thread bound.

    vLLM's own CPU executor would start a ``VLLM::Worker`` process next to the engine core. The engine
    core's main thread runs the model: it is bound to the cores ``VLLM_CPU_OMP_THREADS_BIND`` names (a
    core per pytest worker, tests/conftest.py), or, outside ``-n``, to the cores vLLM chose and logged.
    """
    engines = [pid for pid in children(server.process.pid) if process_name(pid).startswith("VLLM::")]
    assert [process_name(pid) for pid in engines] == ["VLLM::EngineCor"]
    bound = os.sched_getaffinity(engines[0])  # the main thread's (its id is the process id)
    logged = re.search(r"engine-core process, bound to cores \[([\d, ]+)\], (\d+) torch threads", server.log())
    assert logged is not None
    assert bound == {int(core) for core in logged[1].split(",")} and int(logged[2]) == len(bound)
    if OMP_BIND in os.environ:
        from vllm.utils.cpu_resource_utils import parse_id_list  # how vLLM reads the variable

        assert bound == set(parse_id_list(os.environ[OMP_BIND]))


def test_models_lists_base_and_every_adapter_with_parent_and_root(client, server) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {server.base_model, *ADAPTERS}
    base = models[server.base_model]
    assert base.model_extra["parent"] is None
    assert base.model_extra["root"] == server.config["model"]["path"]
    for name in ADAPTERS:
        assert models[name].model_extra["parent"] == server.base_model
        assert models[name].model_extra["root"].endswith(f"adapters/{name}")


@pytest.mark.parametrize("model", [None, *ADAPTERS])
def test_completion(client, server, model: str | None) -> None:
    model = model or server.base_model
    result = client.completions.create(model=model, prompt="The", max_tokens=12, temperature=0)
    choice = result.choices[0]
    assert result.model == model
    assert choice.text
    assert choice.finish_reason in ("length", "stop")
    assert result.usage.completion_tokens == 12 or choice.finish_reason == "stop"
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_adapters_change_the_output(client, server) -> None:
    outputs = {
        model: client.completions.create(model=model, prompt="The", max_tokens=16, temperature=0).choices[0].text
        for model in (server.base_model, *ADAPTERS)
    }
    assert len(set(outputs.values())) == 4, outputs


def chat_tokens(server, model: str, content: str) -> dict:
    """A greedy chat answer with its prompt and output token ids."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 16,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("model", ADAPTERS)
def test_chat(client, model: str) -> None:
    result = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Tell me something."}], max_tokens=16, temperature=0
    )
    assert result.object == "chat.completion"
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content
    assert result.usage.prompt_tokens > 5  # the chat template wrapped the message


@pytest.mark.parametrize("model", ADAPTERS)
def test_chat_applies_the_adapter(server, model: str) -> None:
    """Chat answers with the adapter: its tokens differ from the base's, and equal the adapter's completion
    of the same templated prompt (completions are checked against transformers + PEFT in test_reference.py,
    and so is chat itself there)."""
    content = "Tell me something."
    chat = chat_tokens(server, model, content)["choices"][0]
    base = chat_tokens(server, server.base_model, content)["choices"][0]
    assert chat["prompt_token_ids"] == base["prompt_token_ids"]
    assert chat["token_ids"] != base["token_ids"], "chat with an adapter answered like the base model"
    body = {"model": model, "prompt": chat["prompt_token_ids"], "max_tokens": 16, "temperature": 0}
    completion = httpx.post(
        f"{server.url}/v1/completions", json={**body, "ignore_eos": True, "return_token_ids": True}, timeout=120
    )
    assert completion.status_code == 200, completion.text
    assert completion.json()["choices"][0]["token_ids"] == chat["token_ids"]


def test_streaming_chat_matches_non_streaming(client) -> None:
    kwargs = dict(
        model="legal", messages=[{"role": "user", "content": "Summarise the clause."}], max_tokens=20, temperature=0
    )
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_streaming_completion_ends_with_done(server) -> None:
    body = {"model": "code", "prompt": "def", "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert len(lines) >= 3


SAMPLED = {"model": "medical", "prompt": "The patient", "max_tokens": 12, "temperature": 1.0}
SEEDS = (7, 8, 9, 10)


def samples(client, **kwargs) -> list[str]:
    """The texts of one request's choices, in index order."""
    result = client.completions.create(**{**SAMPLED, **kwargs})
    assert sorted(c.index for c in result.choices) == list(range(kwargs.get("n", 1)))
    return [c.text for c in sorted(result.choices, key=lambda c: c.index)]


def test_same_seed_gives_the_same_samples(client) -> None:
    first = samples(client, n=3, seed=SEEDS[0])
    assert samples(client, n=3, seed=SEEDS[0]) == first


def test_different_seeds_give_different_samples(client) -> None:
    by_seed = {seed: tuple(samples(client, seed=seed)) for seed in SEEDS}
    assert len(set(by_seed.values())) >= len(SEEDS) - 1, by_seed  # a collision of 12 sampled tokens is rare


def test_n_gives_distinct_samples(client) -> None:
    texts = samples(client, n=4, seed=SEEDS[0])
    assert len(texts) == 4
    assert len(set(texts)) >= 3, texts


def test_temperature_zero_is_greedy_and_temperature_samples(client) -> None:
    greedy = samples(client, temperature=0)
    assert all(samples(client, temperature=0, seed=seed) == greedy for seed in SEEDS)  # the seed does not matter
    sampled = [samples(client, seed=seed) for seed in SEEDS]
    assert any(s != greedy for s in sampled), (greedy, sampled)


def test_tiny_top_p_is_greedy(client) -> None:
    greedy = samples(client, temperature=0)
    assert all(samples(client, top_p=1e-6, seed=seed) == greedy for seed in SEEDS)
    assert any(samples(client, top_p=1.0, seed=seed) != greedy for seed in SEEDS)  # top_p is what made it greedy


def test_stop_strings_end_the_text(client) -> None:
    full = client.completions.create(model="code", prompt="The", max_tokens=24, temperature=0).choices[0].text
    stop = full.strip().split()[1] if len(full.split()) > 2 else full.strip()[:2]
    cut = client.completions.create(model="code", prompt="The", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in cut.choices[0].text
    assert full.startswith(cut.choices[0].text)


def test_completion_logprobs(client) -> None:
    result = client.completions.create(model="code", prompt="The", max_tokens=6, temperature=0, logprobs=3)
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    for _token, lp, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert lp <= 0
        assert 1 <= len(top) <= 3
        # Greedy: the sampled token is the best one, up to bf16 rounding of near-tied logits.
        assert max(top.values()) == pytest.approx(lp, abs=0.05)
    assert "".join(logprobs.tokens) == result.choices[0].text


def test_chat_logprobs(client) -> None:
    result = client.chat.completions.create(
        model="legal",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = result.choices[0].logprobs.content
    assert len(content) == 5
    assert all(len(entry.top_logprobs) == 2 and entry.logprob <= 0 for entry in content)


# ---- errors: OpenAI-style JSON, right status, field named ------------------------------------


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_unknown_model_is_404(server, client) -> None:
    response = httpx.post(f"{server.url}/v1/completions", json={"model": "nope", "prompt": "x"})
    assert response.status_code == 404
    error = error_of(response)
    assert error["code"] == "model_not_found" and error["param"] == "model" and "nope" in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": "code", "prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ("/v1/completions", {"model": "code", "prompt": "x", "temperature": 5}, "temperature"),
        ("/v1/completions", {"model": "code"}, "prompt"),
        ("/v1/completions", {"model": "code", "prompt": "x", "bogus_field": 1}, "bogus_field"),
        ("/v1/chat/completions", {"model": "code", "messages": []}, "messages"),
        (
            "/v1/chat/completions",
            {"model": "code", "messages": [{"role": "wizard", "content": "x"}]},
            "messages.0.role",
        ),
        ("/v1/chat/completions", {"model": "code", "messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
    ],
)
def test_invalid_body_is_400_naming_the_field(server, path: str, body: dict, param: str) -> None:
    response = httpx.post(f"{server.url}{path}", json=body)
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == param
    assert param in error["message"]


def test_malformed_json_is_400(server) -> None:
    response = httpx.post(
        f"{server.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error_of(response)


def test_prompt_longer_than_context_is_400(server) -> None:
    limit = server.config["model"]["max_model_len"]
    response = httpx.post(f"{server.url}/v1/completions", json={"model": "code", "prompt": "word " * (limit + 10)})
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "context_length_exceeded" and str(limit) in error["message"]
    response = httpx.post(f"{server.url}/v1/completions", json={"model": "code", "prompt": "hi", "max_tokens": limit})
    assert response.status_code == 400 and error_of(response)["param"] == "max_tokens"


def test_unknown_route_is_404_in_the_same_shape(server) -> None:
    response = httpx.get(f"{server.url}/v1/nothing")
    assert response.status_code == 404
    error_of(response)


def test_server_keeps_serving_after_errors(client) -> None:
    result = client.completions.create(model="code", prompt="The", max_tokens=4, temperature=0)
    assert result.choices[0].text


def _one_response(sock: socket.socket) -> bytes:
    """Read one HTTP/1.1 response (headers and a Content-Length body); b"" if the server closed instead."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
    assert match is not None, head
    length = int(match.group(1))
    while len(body) < length:
        body += sock.recv(65536)
    return head


def test_an_idle_connection_outlives_the_clients_pool_expiry(server) -> None:
    """httpx (so the OpenAI SDK) reuses a pooled connection idle for up to 5 s; uvicorn's default closes one
    after 5 s idle, so a reused connection could be reset under the client's request. Ours stays open longer."""
    host, port = server.url.removeprefix("http://").split(":")
    request = f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        assert _one_response(sock).startswith(b"HTTP/1.1 200")
        time.sleep(CLIENT_POOL_EXPIRY_S + 1)
        sock.sendall(request)
        assert _one_response(sock).startswith(b"HTTP/1.1 200")  # b"": the server had closed it
