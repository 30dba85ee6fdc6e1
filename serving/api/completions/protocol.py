"""Request and response models of /v1/completions (OpenAI's legacy completions API)."""

from __future__ import annotations

import json
import time
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from serving.api.logprobs import TokenLogprob
from serving.api.protocol import MAX_LOGPROBS, MAX_PROMPTS, SamplingRequest, UsageInfo


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: str | list) -> str | list:
        if isinstance(prompt, list) and (not prompt or any(isinstance(p, list) and not p for p in prompt)):
            raise ValueError("prompt must not be an empty list")
        if isinstance(prompt, list) and not isinstance(prompt[0], int) and len(prompt) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts are allowed in one request, got {len(prompt)}")
        return prompt

    @property
    def prompt_count(self) -> int:
        """A string or one list of token ids is one prompt; a list of either is one prompt per item."""
        return 1 if isinstance(self.prompt, str) or isinstance(self.prompt[0], int) else len(self.prompt)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []

    @classmethod
    def of(cls, tokens: list[TokenLogprob], k: int, text_offset_start: int) -> CompletionLogprobs:
        """The legacy format: parallel lists, ``top_logprobs`` a dict per token (``None`` when ``k`` is 0),
        offsets counted from ``text_offset_start`` (where this chunk's text starts in the choice)."""
        result = cls()
        offset = text_offset_start
        for t in tokens:
            result.tokens.append(t.token)
            result.token_logprobs.append(t.logprob)
            result.top_logprobs.append(dict(t.top) if k else None)
            result.text_offset.append(offset)
            offset += len(t.token)
        return result


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None  # vLLM's reason, passed through as its own server does (stop, length, ...)
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


_json = json.JSONEncoder(ensure_ascii=False).encode  # a str or None, as pydantic writes them (UTF-8, same escapes)


class CompletionChunks:
    """The SSE events of a plain streamed completion (no logprobs, no token ids), rendered without models.

    A chunk built as a :class:`CompletionChoice` in a :class:`CompletionResponse`
    and serialized costs about 4.5 us; a stream sends one per token. The
    request's constant part (id, created, model) is rendered here once, by
    pydantic, and each chunk writes only the choice's index, text and finish
    reason into it (about 1.2 us); the bytes are the models' own
    (tests/serving/api/test_completion_chunks.py compares them).
    """

    def __init__(self, request_id: str, created: int, model: str) -> None:
        empty = CompletionResponse(id=request_id, created=created, model=model, choices=[]).model_dump_json()
        head, choices, tail = empty.partition('"choices":[]')
        assert choices, empty  # the field the chunk's choice goes into
        self._head = f'data: {head}"choices":[{{"index":'
        self._tail = f"}}]{tail}\n\n"

    def event(self, index: int, text: str, finish_reason: str | None) -> str:
        """``data: {...}``: one chunk of choice ``index``, equal to ``sse_event`` of its response model."""
        return (
            f'{self._head}{index},"text":{_json(text)},"logprobs":null,"finish_reason":{_json(finish_reason)},'
            f'"prompt_token_ids":null,"token_ids":null{self._tail}'
        )
