"""A streamed completion's events: chunks rendered without models are the models' own bytes, a one-choice
stream's finishing chunk goes out in one write with the usage and ``[DONE]``, and that write ends the HTTP body.

The end-to-end check (a real server, the openai client) is tests/e2e/test_openai_api.py's streaming tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serving.api.completions.protocol import CompletionChoice, CompletionChunks, CompletionRequest, CompletionResponse
from serving.api.completions.serving import CompletionServing
from serving.api.disconnect import event_stream
from serving.api.protocol import UsageInfo
from serving.api.streams import SSE_DONE, sse_event

REASONS = st.sampled_from([None, "length", "stop", "abort"])


def model_event(request_id: str, created: int, model: str, index: int, text: str, reason: str | None) -> str:
    choice = CompletionChoice(index=index, text=text, finish_reason=reason)
    return sse_event(CompletionResponse(id=request_id, created=created, model=model, choices=[choice]))


@given(text=st.text(), index=st.integers(0, 1000), reason=REASONS, model=st.text(min_size=1), created=st.integers(0))
def test_a_chunk_is_the_models_json_byte_for_byte(text: str, index: int, reason: str | None, model: str, created: int):
    chunks = CompletionChunks("cmpl-1", created, model)
    assert chunks.event(index, text, reason) == model_event("cmpl-1", created, model, index, text, reason)


def serving_with(outputs: list[tuple[int, str, str | None]]) -> CompletionServing:
    """The serving class with its engine stream replaced by ``outputs`` (choice index, text, finish reason)."""

    async def fake_outputs(job) -> AsyncIterator[tuple[int, SimpleNamespace]]:
        for index, text, reason in outputs:
            job.usage.completion_tokens += 1
            yield index, SimpleNamespace(text=text, finish_reason=reason, logprobs=None, token_ids=[1])
        job.usage.total_tokens = job.usage.prompt_tokens + job.usage.completion_tokens

    serving = CompletionServing.__new__(CompletionServing)
    serving.outputs = fake_outputs  # type: ignore[method-assign]
    return serving


def job(prompts: int, n: int) -> SimpleNamespace:
    return SimpleNamespace(request_id="cmpl-1", created=5, prompts=[[1, 2]] * prompts, n=n, usage=UsageInfo())


async def events(serving: CompletionServing, request: CompletionRequest, job: SimpleNamespace) -> list[str]:
    return [event async for event in serving.stream(request, job)]  # type: ignore[arg-type]


@pytest.mark.parametrize("include_usage", [False, True])
async def test_one_choice_ends_in_one_write(include_usage: bool) -> None:
    outputs = [(0, "a", None), (0, "b", None), (0, "c", "length")]
    request = CompletionRequest(
        model="code",
        prompt="x",
        stream=True,
        stream_options={"include_usage": include_usage} if include_usage else None,
    )
    sent = await events(serving_with(outputs), request, job(1, 1))
    chunks = [model_event("cmpl-1", 5, "code", *output) for output in outputs]
    usage = sse_event(CompletionResponse(id="cmpl-1", created=5, model="code", choices=[], usage=UsageInfo(
        completion_tokens=3, total_tokens=3)))  # fmt: skip
    assert sent == [*chunks[:2], chunks[2] + (usage if include_usage else "") + SSE_DONE]


async def test_several_choices_send_every_chunk_as_it_comes() -> None:
    """With two choices, one finishing does not end the stream: nothing is held back."""
    outputs = [(0, "a", None), (1, "b", "stop"), (0, "c", "length")]
    request = CompletionRequest(model="code", prompt="x", stream=True, n=2)
    sent = await events(serving_with(outputs), request, job(1, 2))
    assert sent == [*(model_event("cmpl-1", 5, "code", *output) for output in outputs), SSE_DONE]


async def test_token_ids_take_the_models_path() -> None:
    request = CompletionRequest(model="code", prompt="x", stream=True, return_token_ids=True)
    sent = await events(serving_with([(0, "a", "stop")]), request, job(1, 1))
    choice = CompletionChoice(index=0, text="a", finish_reason="stop", token_ids=[1])
    assert sent == [sse_event(CompletionResponse(id="cmpl-1", created=5, model="code", choices=[choice])) + SSE_DONE]


async def body_messages(events: list[str]) -> tuple[list[dict], list[str]]:
    """The ASGI messages of an SSE response over ``events``, as uvicorn (ASGI spec 2.3) drives it; and its closes."""
    closed: list[str] = []

    async def source() -> AsyncIterator[str]:
        try:
            for event in events:
                yield event
        finally:
            closed.append("body")

    response = await event_stream(source(), on_close=lambda: closed.append("on_close"))
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        await asyncio.Event().wait()  # the client stays
        return {}

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}}
    await response(scope, receive, send)
    return [m for m in sent if m["type"] == "http.response.body"], closed


async def test_the_done_event_ends_the_body_in_its_own_write() -> None:
    bodies, closed = await body_messages(["data: 1\n\n", "data: 2\n\n" + SSE_DONE])
    assert [(m["body"], m["more_body"]) for m in bodies] == [
        (b"data: 1\n\n", True),
        (("data: 2\n\n" + SSE_DONE).encode(), False),
    ]
    assert closed[0] == "on_close"  # the stream was closed (its lease released) before the response returned


async def test_a_stream_without_done_still_ends_its_body() -> None:
    bodies, closed = await body_messages(["data: 1\n\n"])
    assert [(m["body"], m["more_body"]) for m in bodies] == [(b"data: 1\n\n", True), (b"", False)]
    assert "on_close" in closed
