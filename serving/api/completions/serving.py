"""Serving class of /v1/completions."""

from __future__ import annotations

from collections.abc import AsyncIterator

from adapter_store import ServedAdapter
from serving.api.completions.protocol import (
    CompletionChoice,
    CompletionChunks,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from serving.api.errors import InvalidRequestError
from serving.api.generation import GenerationJob, GenerationServing
from serving.api.limits import max_tokens_for
from serving.api.logprobs import token_logprobs
from serving.api.sampling import check_token_ids
from serving.api.streams import SSE_DONE, sse_event


def prompt_size(prompt: str | list[str] | list[int] | list[list[int]]) -> int:
    """Characters of text, or count of token ids: what tokenizing or checking the prompt costs."""
    if isinstance(prompt, str):
        return len(prompt)
    return sum(1 if isinstance(p, int) else len(p) for p in prompt)


class CompletionServing(GenerationServing):
    endpoint = "completions"
    request_prefix = "cmpl"

    async def prepare(self, request: CompletionRequest, adapter: ServedAdapter | None) -> GenerationJob:
        prompts = await self.tokenize(lambda: self._prompt_ids(request.prompt), prompt_size(request.prompt))
        model_len, limits = self.settings.model.max_model_len, self.settings.limits
        max_tokens = min(
            max_tokens_for(len(ids), request.max_tokens, "max_tokens", model_len, limits) for ids in prompts
        )
        return self.new_job(request, adapter, prompts, max_tokens, request.logprobs)

    def routing_text(self, request: CompletionRequest) -> str:
        if isinstance(request.prompt, str):
            return request.prompt
        if all(isinstance(p, str) for p in request.prompt):
            return "\n".join(request.prompt)  # type: ignore[arg-type]
        raise InvalidRequestError(
            f"Routing (model {request.model!r}) needs a text prompt, not token ids; name a model instead.",
            param="prompt",
        )

    def _prompt_ids(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        """Every prompt as token ids (blocking: see ``tokenize``); sent ids must be in the vocabulary."""
        if isinstance(prompt, str):
            return [self.tokenizer.encode(prompt, add_special_tokens=True)]
        if isinstance(prompt[0], str):
            return [self.tokenizer.encode(p, add_special_tokens=True) for p in prompt]
        prompts = [list(prompt)] if isinstance(prompt[0], int) else [list(p) for p in prompt]
        for ids in prompts:
            check_token_ids(ids, self.vocab_size)
        return prompts

    async def complete(self, request: CompletionRequest, job: GenerationJob) -> CompletionResponse:
        choices: dict[int, CompletionChoice] = {}
        async for index, output in self.outputs(job):
            choice = CompletionChoice(index=index, text=output.text, finish_reason=output.finish_reason)
            if request.logprobs is not None and output.logprobs is not None:
                tokens = token_logprobs(list(output.token_ids), output.logprobs, request.logprobs)
                choice.logprobs = CompletionLogprobs.of(tokens, request.logprobs, 0)
            if request.return_token_ids:
                choice.prompt_token_ids = job.prompts[index // job.n]
                choice.token_ids = list(output.token_ids)
            choices[index] = choice
        return CompletionResponse(
            id=job.request_id,
            created=job.created,
            model=request.model,
            choices=[choices[i] for i in sorted(choices)],
            usage=job.usage,
        )

    async def stream(self, request: CompletionRequest, job: GenerationJob) -> AsyncIterator[str]:
        """One event per engine output, then the usage (if asked) and ``[DONE]``.

        With one choice, its finishing chunk is the stream's last (the engine
        stream ends right after it): it goes out in one write with the usage and
        ``[DONE]``, one or two socket writes a request fewer than an event a write.
        """
        plain = request.logprobs is None and not request.return_token_ids
        chunks = CompletionChunks(job.request_id, job.created, request.model)
        single = len(job.prompts) * job.n == 1
        text_offsets: dict[int, int] = {}
        last = ""
        async for index, output in self.outputs(job):
            if plain:
                event = chunks.event(index, output.text, output.finish_reason)
            else:
                choice = CompletionChoice(index=index, text=output.text, finish_reason=output.finish_reason)
                if request.logprobs is not None and output.logprobs is not None:
                    start = text_offsets.get(index, 0)
                    tokens = token_logprobs(list(output.token_ids), output.logprobs, request.logprobs)
                    choice.logprobs = CompletionLogprobs.of(tokens, request.logprobs, start)
                    text_offsets[index] = start + len(output.text)
                if request.return_token_ids:
                    choice.token_ids = list(output.token_ids)
                chunk = CompletionResponse(
                    id=job.request_id, created=job.created, model=request.model, choices=[choice]
                )
                event = sse_event(chunk)
            if single and output.finish_reason is not None:
                last = event
            else:
                yield event
        if request.include_usage:
            last += sse_event(
                CompletionResponse(
                    id=job.request_id, created=job.created, model=request.model, choices=[], usage=job.usage
                )
            )
        yield last + SSE_DONE
