"""Request and response models shared by the completion and chat endpoints."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_LOGPROBS = 20
MAX_N = 16
MAX_PROMPTS = 2048
"""Prompts in one request, whatever the configuration (``limits.max_prompts_per_request`` may lower it)."""
MAX_STOP = 64
MAX_STOP_CHARS = 1024
"""Stop strings are matched on every generated token: their count and length are bounded (``limits.max_stop*``)."""
MAX_TOP_K = 2**31 - 1  # the engine keeps top_k as a 32-bit integer
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # the engine's seeds (a torch generator, 64-bit integers on the wire)


class OpenAIBaseModel(BaseModel):
    """Unknown request fields are rejected with a 400 naming them, as OpenAI does; so are NaN and infinities."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class SamplingRequest(OpenAIBaseModel):
    """Fields every generation endpoint takes (OpenAI's, plus vLLM's common extras)."""

    model: str
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: str | None = None
    # vLLM extensions, accepted by vLLM's own OpenAI server under the same names.
    top_k: int = Field(default=0, ge=-1, le=MAX_TOP_K, description="0 or -1: off; otherwise at least 1.")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    return_token_ids: bool = Field(default=False, description="Add prompt and output token ids to each choice.")

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings are allowed, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings must have at most {MAX_STOP_CHARS} characters")
        return stop

    @property
    def prompt_count(self) -> int:
        """Prompts the request runs; its cost is ``prompt_count * n`` sequences."""
        return 1

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
