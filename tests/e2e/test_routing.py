"""``model: auto`` through the real server: the router picks the adapter, the headers say which
and why, and the output is that adapter's own (greedy, compared with naming it explicitly).

The session server runs configs/dev.yaml, whose routing section uses the demo
routes (configs/routes/demo.yaml) with the real all-MiniLM-L6-v2 encoder.
"""

from __future__ import annotations

import json

import httpx
import pytest

ROUTED = [
    # (prompt, adapter, method)
    ("My Python script raises a KeyError when it reads the config file.", "code", "keyword"),
    ("Why does my loop never finish when the list is empty?", "code", "semantic"),
    ("Can my landlord keep my deposit after I move out?", "legal", "keyword"),
    ("What does the other side owe me if they break our agreement?", "legal", "semantic"),
    ("I have had a sore throat and a fever for three days.", "medical", "keyword"),
    ("How long does it take to recover from a sprained knee?", "medical", "semantic"),
]
OFF_TOPIC = "What's the capital of Australia?"
LANDMARK = "Tell me about the history of the Eiffel Tower."

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def chat(http: httpx.Client, model: str, prompt: str, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 12, "temperature": 0}
    return http.post("/v1/chat/completions", json={**body, **extra})


def routing_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.lower().startswith("x-route")}


def content(response: httpx.Response) -> str:
    return response.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize(("prompt", "adapter", "method"), ROUTED)
def test_auto_picks_the_adapter_and_serves_its_output(http, server, prompt: str, adapter: str, method: str) -> None:
    routed = chat(http, "auto", prompt)
    assert routed.status_code == 200, routed.text
    assert routed.headers["x-routed-adapter"] == adapter
    assert routed.headers["x-route-method"] == method
    assert 0.0 < float(routed.headers["x-route-score"]) <= 1.0
    assert routed.json()["model"] == adapter

    explicit = chat(http, adapter, prompt)
    assert explicit.status_code == 200
    assert routing_headers(explicit) == {}
    assert content(routed) == content(explicit)
    # ...and that is the adapter's answer, not the base model's (test_reference.py checks chat against PEFT).
    assert content(routed) != content(chat(http, server.base_model, prompt))


def test_off_topic_prompt_goes_to_the_base_model(http, server) -> None:
    routed = chat(http, "auto", OFF_TOPIC)
    assert routed.status_code == 200
    assert routed.headers["x-routed-adapter"] == "base"
    assert routed.headers["x-route-method"] == "default"
    assert routed.json()["model"] == server.base_model
    base = chat(http, server.base_model, OFF_TOPIC)
    assert content(routed) == content(base)


def test_explicit_model_is_never_rerouted(http) -> None:
    prompt = ROUTED[0][0]  # a code prompt, sent to the legal adapter by name
    response = chat(http, "legal", prompt)
    assert response.status_code == 200
    assert response.json()["model"] == "legal"
    assert routing_headers(response) == {}


def _stream_text(http: httpx.Client, body: dict) -> tuple[httpx.Headers, str]:
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"])
    return response.headers, text


def test_streaming_completion_is_routed_with_headers(http, server) -> None:
    prompt, adapter, _ = ROUTED[4]
    body = {"prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True}  # text, even if EOS comes first
    headers, routed_text = _stream_text(http, {**body, "model": "auto"})
    assert headers["x-routed-adapter"] == adapter and headers["x-route-method"] == "keyword"
    _, explicit_text = _stream_text(http, {**body, "model": adapter})
    assert routed_text == explicit_text and routed_text
    _, base_text = _stream_text(http, {**body, "model": server.base_model})
    assert routed_text != base_text


def test_auto_with_token_ids_is_a_clear_400(http) -> None:
    response = http.post("/v1/completions", json={"model": "auto", "prompt": [1, 2, 3], "max_tokens": 4})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "prompt" and "needs a text prompt" in error["message"]


def test_route_added_at_run_time_takes_effect_and_can_be_removed(http) -> None:
    assert chat(http, "auto", LANDMARK).headers["x-routed-adapter"] == "base"
    route = {
        "adapter": "legal",
        "utterances": ["Tell me about a famous tower in Paris."],
        "keywords": [{"patterns": ["eiffel"]}],
    }
    created = http.put("/admin/routes/landmarks", json=route)
    assert created.status_code == 201, created.text
    assert created.json()["name"] == "landmarks" and created.json()["adapter"] == "legal"
    try:
        assert "landmarks" in [r["name"] for r in http.get("/admin/routes").json()["data"]]
        routed = chat(http, "auto", LANDMARK)
        assert (routed.headers["x-routed-adapter"], routed.headers["x-route-method"]) == ("legal", "keyword")
        assert content(routed) == content(chat(http, "legal", LANDMARK))

        replaced = http.put("/admin/routes/landmarks", json={**route, "adapter": "medical"})
        assert replaced.status_code == 200
        assert chat(http, "auto", LANDMARK).headers["x-routed-adapter"] == "medical"
    finally:
        assert http.delete("/admin/routes/landmarks").status_code == 200
    assert chat(http, "auto", LANDMARK).headers["x-routed-adapter"] == "base"


ADMIN_ERRORS = [
    # (method, path, body, status, param, message)
    ("PUT", "/admin/routes/x", {"adapter": "nope", "utterances": ["a"]}, 400, "adapter", "not served"),
    ("PUT", "/admin/routes/x", {"adapter": "code"}, 400, None, "needs utterances, keyword rules, or both"),
    (
        "PUT",
        "/admin/routes/x",
        {"adapter": "code", "keywords": [{"patterns": ["(bad"]}]},
        400,
        None,
        "regular expression",
    ),
    ("PUT", "/admin/routes/x", {"name": "y", "adapter": "code", "utterances": ["a"]}, 400, "name", "drop `name`"),
    ("DELETE", "/admin/routes/missing", None, 404, "name", "The route 'missing' does not exist"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "param", "message"), ADMIN_ERRORS)
def test_admin_errors_are_openai_shaped(http, method, path, body, status, param, message) -> None:
    response = http.request(method, path, json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"]
    if param is not None:
        assert error["param"] == param
    assert [r["name"] for r in http.get("/admin/routes").json()["data"]] == ["code", "legal", "medical"]


def metric(text: str, sample: str) -> float:
    """The value of one exposition line (``name{labels}``), 0 when the series does not exist yet."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


ROUTING_SERIES = (
    'loraserve_routing_decisions_total{adapter="legal",method="keyword"}',
    'loraserve_routing_decisions_total{adapter="code",method="semantic"}',
    'loraserve_routing_decisions_total{adapter="base",method="default"}',
    'loraserve_routing_latency_seconds_count{method="keyword"}',
    'loraserve_routing_latency_seconds_count{method="semantic"}',
    'loraserve_routing_latency_seconds_count{method="default"}',
)


def test_routing_metrics(http) -> None:
    before = http.get("/metrics").text
    for prompt in (ROUTED[2][0], ROUTED[1][0], OFF_TOPIC):  # keyword (legal), semantic (code), default
        assert chat(http, "auto", prompt).status_code == 200
    after = http.get("/metrics").text
    deltas = {series: metric(after, series) - metric(before, series) for series in ROUTING_SERIES}
    assert deltas == dict.fromkeys(ROUTING_SERIES, 1.0)
