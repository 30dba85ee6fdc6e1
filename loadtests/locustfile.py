"""Locust load test for an OpenAI-compatible multi-LoRA server (loraserve, vLLM's own server, ...).

    locust -f loadtests/locustfile.py --headless -u 8 -r 8 -t 60s -H http://127.0.0.1:8000 \\
        --zipf-s 1.0 --stream-share 0.5 --bad-share 0.1 --records records.jsonl

``loraserve loadtest`` runs this headless and turns the records into a summary
with vLLM's benchmark fields (``serving/loadtest``).

Traffic, drawn per request:

* **targeted** requests name one of ``--models`` (default: every model the
  server lists in ``/v1/models``), with Zipf(``--zipf-s``) popularity in the
  given order (S-LoRA's power-law workloads): ``/v1/completions`` or
  ``/v1/chat/completions`` (``--chat-share``), streamed or not
  (``--stream-share``), with a prompt from the adapter's domain;
* ``model: "auto"`` requests (``--auto-share``) with a routing prompt of a
  random domain: expected to succeed (200);
* **bad** requests (``--bad-share``): unknown model (404), wrong field types
  (400), a prompt longer than the context and ``max_tokens`` over the context
  (400). A bad request counts as a success when the expected status *and* an
  OpenAI error body ``{"error": {message, type, param, code}}`` arrive, as a
  failure otherwise.

Streaming timing. Each SSE line is timestamped when it arrives: lines are read
with geventhttpclient's ``readline`` on the response socket, which returns a
line as soon as it is in the buffer. (Locust's own ``iter_lines`` reads
1024-byte blocks and ``requests``' ``iter_lines`` 512-byte ones: both wait for
several events and make inter-token gaps look like zero.) Per model label, the
locust statistics get custom rows: request type ``TTFT`` (time to first
token), ``ITL`` (every gap between token-carrying events), ``TPOT`` ((E2EL -
TTFT) / (output tokens - 1)) and ``E2EL`` (end to end). For a streamed
request, locust's own POST row is also end to end (not time to headers).
Output token counts come from ``usage`` (``stream_options.include_usage``).

``--records FILE`` writes one JSON line per request with exact timings, since
locust rounds its percentiles (to 10 ms above 100 ms, to 100 ms above 1 s).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from locust import FastHttpUser, events, task

# ------------------------------------------------------------------ prompts
DOMAIN_PROMPTS: dict[str, list[str]] = {
    "code": [
        "Write a Python function that returns the sum of a list.",
        "The function reads the file and returns a list of lines.",
        "Explain what this loop does: for i in range(10): print(i)",
        "How do I sort a dictionary by value in Python?",
    ],
    "legal": [
        "The party of the first part shall indemnify the other party against",
        "Draft a clause on termination of this agreement for breach.",
        "What does the governing law clause of a contract mean?",
        "The licensee shall not assign this licence without consent.",
    ],
    "medical": [
        "The patient was prescribed a daily dose of",
        "What are the common symptoms of a viral infection?",
        "Summarise the discharge notes of a patient after surgery.",
        "The patient reports chest pain and shortness of breath.",
    ],
    "general": [
        "Tell me something.",
        "The weather today is",
        "Once upon a time there was a",
        "Write a short note to a friend.",
    ],
}
ROUTING_DOMAINS = ("code", "legal", "medical")


def domain_of(model: str) -> str:
    """The prompt domain of a model name: a demo adapter's name, else general text."""
    return next((d for d in ROUTING_DOMAINS if d in model.lower()), "general")


def zipf_weights(n: int, s: float) -> list[float]:
    """Popularity of the k-th model (k from 0): 1 / (k + 1) ** s, normalised."""
    raw = [1.0 / (k + 1) ** s for k in range(n)]
    total = sum(raw)
    return [w / total for w in raw]


# ------------------------------------------------------------------ arguments
@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    group = parser.add_argument_group("loraserve workload")
    group.add_argument(
        "--models", default="", help="comma-separated model names, most popular first (default: all served)"
    )
    group.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent of model popularity (0 = uniform)")
    group.add_argument("--stream-share", type=float, default=0.5, help="share of targeted requests that stream")
    group.add_argument("--chat-share", type=float, default=0.5, help="share of requests sent to /v1/chat/completions")
    group.add_argument("--auto-share", type=float, default=0.0, help='share of requests with model "auto" (routing)')
    group.add_argument("--bad-share", type=float, default=0.1, help="share of bad requests that must get a clean 4xx")
    group.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every good request")
    group.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of good requests")
    group.add_argument("--ignore-eos", action="store_true", help="always generate max_tokens (vLLM's ignore_eos)")
    group.add_argument("--records", default="", help="write one JSON line per request to this file")
    group.add_argument("--workload-seed", type=int, default=0, help="seed of the request draw (user k uses seed + k)")


@dataclass
class Workload:
    """What the users send, fixed at the first user's start from the options and /v1/models."""

    models: list[str]
    weights: list[float]
    max_model_len: int
    options: Any


@dataclass
class Record:
    """One request, as written to ``--records`` and read by ``loadtests.summary``."""

    kind: str  # "targeted" | "auto" | "bad"
    endpoint: str  # "completions" | "chat"
    stream: bool
    model: str
    label: str  # model label of the custom metrics ("auto" for routed requests)
    start: float  # time.time() at send
    expected_status: int
    status: int | None = None
    success: bool = False
    error: str | None = None
    e2el_s: float | None = None
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    served_model: str | None = None
    bad_case: str | None = None


_workload: Workload | None = None
_records_file = None


@events.test_start.add_listener
def _open_records(environment: Any, **_: Any) -> None:
    global _records_file
    path = environment.parsed_options.records if environment.parsed_options else ""
    if path:
        # Line-buffered appends: one write per record, so --processes workers can share the file.
        _records_file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (closed at quit)


@events.quitting.add_listener
def _close_records(**_: Any) -> None:
    global _records_file
    if _records_file is not None:
        _records_file.close()
        _records_file = None


def write_record(record: Record) -> None:
    if _records_file is not None:
        _records_file.write(json.dumps(asdict(record)) + "\n")


def fire_metric(metric: str, label: str, seconds: float, length: int = 0) -> None:
    """One custom locust statistics row per (metric, model label)."""
    events.request.fire(
        request_type=metric, name=label, response_time=seconds * 1000.0, response_length=length,
        exception=None, context={},
    )  # fmt: skip


def sse_lines(response: Any) -> Iterator[bytes]:
    """SSE lines of a streamed FastHttpUser response, each yielded as soon as it has arrived."""
    raw = response._response  # geventhttpclient's socket response (see the module docstring)
    while line := raw.readline(b"\n"):
        yield line.rstrip(b"\r\n")


def is_openai_error(response: Any) -> bool:
    """The body is OpenAI's error shape: {"error": {message, type, param, code}}."""
    try:
        body = response.json()
    except (ValueError, TypeError):
        return False
    error = body.get("error") if isinstance(body, dict) else None
    return (
        isinstance(error, dict)
        and {"message", "type", "param", "code"} <= set(error)
        and isinstance(error["message"], str)
        and bool(error["message"])
    )


class OpenAIUser(FastHttpUser):
    """One client: one request at a time, no think time (closed-loop load)."""

    network_timeout = 600.0
    connection_timeout = 60.0
    _count = 0

    def on_start(self) -> None:
        global _workload
        if _workload is None:
            _workload = self._discover()
        OpenAIUser._count += 1
        self.workload = _workload  # discovered once, shared by every user
        self.rng = random.Random(_workload.options.workload_seed + OpenAIUser._count)
        self.bad_sent = 0

    def _discover(self) -> Workload:
        """Models and context length from /v1/models (fails the test when the server lists none)."""
        options = self.environment.parsed_options
        with self.client.get("/v1/models", name="/v1/models", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"/v1/models answered {response.status_code}")
                raise RuntimeError(f"GET /v1/models failed with {response.status_code}: {response.text}")
            cards = response.json()["data"]
        served = [card["id"] for card in cards]
        models = [m.strip() for m in options.models.split(",") if m.strip()] or served
        unknown = sorted(set(models) - set(served))
        if unknown:
            raise RuntimeError(f"--models names {unknown}, which the server does not serve ({served})")
        lengths = [card["max_model_len"] for card in cards if card.get("max_model_len")]
        if not lengths:
            raise RuntimeError("/v1/models gives no max_model_len: cannot build the too-long bad requests")
        return Workload(models, zipf_weights(len(models), options.zipf_s), max(lengths), options)

    # -------------------------------------------------------------- the task
    @task
    def one_request(self) -> None:
        w, rng = self.workload, self.rng
        opts = w.options
        draw = rng.random()
        endpoint = "chat" if rng.random() < opts.chat_share else "completions"
        if draw < opts.bad_share:
            self._bad(endpoint)
            return
        if draw < opts.bad_share + opts.auto_share:
            kind, model, label, domain = "auto", "auto", "auto", rng.choice(ROUTING_DOMAINS)
        else:
            model = rng.choices(w.models, w.weights)[0]
            kind, label, domain = "targeted", model, domain_of(model)
        stream = rng.random() < opts.stream_share
        body = self._body(endpoint, model, rng.choice(DOMAIN_PROMPTS[domain]), stream)
        record = Record(kind=kind, endpoint=endpoint, stream=stream, model=model, label=label,
                        start=time.time(), expected_status=200)  # fmt: skip
        if stream:
            self._streamed(body, record)
        else:
            self._plain(body, record)
        write_record(record)

    def _body(self, endpoint: str, model: str, prompt: str, stream: bool) -> dict:
        opts = self.environment.parsed_options
        body: dict[str, Any] = {"model": model, "max_tokens": opts.max_tokens, "temperature": opts.temperature}
        if opts.ignore_eos:
            body["ignore_eos"] = True
        if endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
            # Token ids date the first token exactly: a byte-level tokenizer can
            # emit tokens whose text is still empty (an incomplete UTF-8 sequence).
            body["return_token_ids"] = True
        return body

    @staticmethod
    def _path(endpoint: str) -> str:
        return "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"

    def _plain(self, body: dict, record: Record) -> None:
        start = time.perf_counter()
        path = self._path(record.endpoint)
        with self.client.post(path, json=body, name=path, catch_response=True) as response:
            record.e2el_s = e2el = time.perf_counter() - start
            record.status = response.status_code
            if response.status_code != 200:
                record.error = f"status {response.status_code}: {(response.text or '')[:300]}"
                response.failure(record.error)
                return
            try:
                payload = response.json()
            except ValueError:
                record.error = f"response is not JSON: {(response.text or '')[:300]}"
                response.failure(record.error)
                return
            usage = payload.get("usage") or {}
            record.prompt_tokens = usage.get("prompt_tokens")
            record.completion_tokens = usage.get("completion_tokens")
            record.served_model = payload.get("model")
            if not payload.get("choices") or record.completion_tokens is None:
                record.error = "response without choices or usage"
                response.failure(record.error)
                return
            record.success = True
        fire_metric("E2EL", record.label, e2el, record.completion_tokens or 0)

    def _streamed(self, body: dict, record: Record) -> None:
        start = time.perf_counter()
        path = self._path(record.endpoint)
        with self.client.post(path, json=body, name=f"{path} stream", stream=True, catch_response=True) as response:
            record.status = response.status_code
            if response.status_code != 200:
                record.e2el_s = time.perf_counter() - start
                record.error = f"status {response.status_code}: {(response.text or '')[:300]}"
                response.failure(record.error)
                return
            done, usage, first, last = False, None, None, start
            for line in sse_lines(response):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    continue
                now = time.perf_counter()
                try:
                    event = json.loads(data)
                except ValueError:
                    record.error = f"stream event is not JSON: {data[:200]!r}"
                    continue
                if "error" in event:
                    record.error = f"error event in stream: {event['error']}"
                    continue
                usage = event.get("usage") or usage
                record.served_model = event.get("model", record.served_model)
                if _carries_tokens(event):
                    if first is None:
                        first = now
                    else:
                        record.itl_s.append(now - last)
                    last = now
            record.e2el_s = e2el = time.perf_counter() - start
            response.request_meta["response_time"] = e2el * 1000.0  # end to end, not headers
            if record.error is None and not done:
                record.error = "stream ended without data: [DONE]"
            if record.error is None and (usage is None or first is None):
                record.error = "stream without usage (include_usage) or without any token"
            if record.error is not None:
                response.failure(record.error)
                return
            assert usage is not None and first is not None  # else record.error is set
            record.ttft_s = ttft = first - start
            record.prompt_tokens = usage.get("prompt_tokens")
            record.completion_tokens = usage.get("completion_tokens")
            record.success = True
        self._fire_stream_metrics(record, ttft, e2el)

    @staticmethod
    def _fire_stream_metrics(record: Record, ttft: float, e2el: float) -> None:
        tokens = record.completion_tokens or 0
        fire_metric("TTFT", record.label, ttft)
        for gap in record.itl_s:
            fire_metric("ITL", record.label, gap)
        if tokens > 1:
            fire_metric("TPOT", record.label, (e2el - ttft) / (tokens - 1))
        fire_metric("E2EL", record.label, e2el, tokens)

    # -------------------------------------------------------------- bad requests
    def _bad(self, endpoint: str) -> None:
        w, rng = self.workload, self.rng
        model = rng.choice(w.models)
        cases = self._bad_cases(endpoint, model, w.max_model_len)
        case, status, body = cases[self.bad_sent % len(cases)]  # every case in turn
        self.bad_sent += 1
        path = self._path(endpoint)
        record = Record(kind="bad", endpoint=endpoint, stream=False, model=str(body.get("model")), label=model,
                        start=time.time(), expected_status=status, bad_case=case)  # fmt: skip
        start = time.perf_counter()
        with self.client.post(path, json=body, name=f"{path} bad:{case}", catch_response=True) as response:
            record.e2el_s = time.perf_counter() - start
            record.status = response.status_code
            if response.status_code != status:
                record.error = f"expected {status}, got {response.status_code}: {(response.text or '')[:300]}"
                response.failure(record.error)
            elif not is_openai_error(response):
                record.error = f"status {status} without an OpenAI error body: {(response.text or '')[:300]}"
                response.failure(record.error)
            else:
                record.success = True
                response.success()
        write_record(record)

    @staticmethod
    def _bad_cases(endpoint: str, model: str, max_model_len: int) -> list[tuple[str, int, dict]]:
        """(case, expected status, body): each must be refused cleanly without touching the engine."""
        long_text = "hello " * (max_model_len + 16)
        if endpoint == "chat":
            ok = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
            return [
                ("unknown_model", 404, {**ok, "model": "no-such-adapter-xyz"}),
                ("bad_type", 400, {**ok, "messages": "not a list"}),
                ("too_long_prompt", 400, {**ok, "messages": [{"role": "user", "content": long_text}]}),
                ("max_tokens_over_context", 400, {**ok, "max_tokens": max_model_len}),
            ]
        ok = {"model": model, "prompt": "Hi", "max_tokens": 4}
        return [
            ("unknown_model", 404, {**ok, "model": "no-such-adapter-xyz"}),
            ("bad_type", 400, {**ok, "max_tokens": "many"}),
            ("too_long_prompt", 400, {**ok, "prompt": long_text}),
            ("max_tokens_over_context", 400, {**ok, "max_tokens": max_model_len}),
        ]


def _carries_tokens(event: dict) -> bool:
    """Whether a stream event carries generated tokens (not only a role, usage or finish reason).

    Token ids count even when their text is still empty; servers that do not
    return ids are judged by text.
    """
    for choice in event.get("choices") or ():
        if choice.get("token_ids") or choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return False
