"""Request and response models of /v1/completions (OpenAI's legacy completions API)."""

from __future__ import annotations

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
