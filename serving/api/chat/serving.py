"""Serving class of /v1/chat/completions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from adapter_store import ServedAdapter
from serving.api.chat.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    DeltaMessage,
)
from serving.api.errors import InvalidRequestError
from serving.api.generation import GenerationJob, GenerationServing
from serving.api.limits import max_tokens_for
from serving.api.logprobs import token_logprobs
from serving.api.streams import SSE_DONE, sse_event

if TYPE_CHECKING:
    from vllm import CompletionOutput


class ChatServing(GenerationServing):
    endpoint = "chat"
    request_prefix = "chatcmpl"

    async def prepare(self, request: ChatCompletionRequest, adapter: ServedAdapter | None) -> GenerationJob:
        prompt = await self.tokenize(lambda: self._prompt_ids(request), sum(len(m.text) for m in request.messages))
        max_tokens = max_tokens_for(
            len(prompt),
            request.output_budget,
            "max_completion_tokens",
            self.settings.model.max_model_len,
            self.settings.limits,
        )
        return self.new_job(request, adapter, [prompt], max_tokens, request.engine_logprobs)

    def _prompt_ids(self, request: ChatCompletionRequest) -> list[int]:
        """The chat template, then the tokenizer (blocking: see ``tokenize``)."""
        messages = [{"role": m.role, "content": m.text} for m in request.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # the template's own error (e.g. roles out of order) explains it
            raise InvalidRequestError(f"The chat template rejected the messages: {e}", param="messages") from e
        return self.tokenizer.encode(text, add_special_tokens=False)

    def routing_text(self, request: ChatCompletionRequest) -> str:
        for message in reversed(request.messages):
            if message.role == "user":
                return message.text
        raise InvalidRequestError(
            f"Routing (model {request.model!r}) needs a user message to route on; name a model instead.",
            param="messages",
        )

    @staticmethod
    def _logprobs(request: ChatCompletionRequest, output: CompletionOutput) -> ChatLogprobs | None:
        if not request.logprobs or output.logprobs is None:
            return None
        return ChatLogprobs.of(token_logprobs(list(output.token_ids), output.logprobs, request.top_logprobs or 0))

    async def complete(self, request: ChatCompletionRequest, job: GenerationJob) -> ChatCompletionResponse:
        choices: dict[int, ChatChoice] = {}
        async for index, output in self.outputs(job):
            choice = ChatChoice(
                index=index, message=AssistantMessage(content=output.text), finish_reason=output.finish_reason
            )
            choice.logprobs = self._logprobs(request, output)
            if request.return_token_ids:
                choice.prompt_token_ids = job.prompts[0]
                choice.token_ids = list(output.token_ids)
            choices[index] = choice
        return ChatCompletionResponse(
            id=job.request_id,
            created=job.created,
            model=request.model,
            choices=[choices[i] for i in sorted(choices)],
            usage=job.usage,
        )

    def _chunk(self, request: ChatCompletionRequest, job: GenerationJob, choices: list[ChatChunkChoice]) -> str:
        return sse_event(
            ChatCompletionChunk(id=job.request_id, created=job.created, model=request.model, choices=choices)
        )

    async def stream(self, request: ChatCompletionRequest, job: GenerationJob) -> AsyncIterator[str]:
        started: set[int] = set()
        async for index, output in self.outputs(job):
            if index not in started:  # OpenAI opens each choice with the role
                started.add(index)
                yield self._chunk(
                    request, job, [ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))]
                )
            choice = ChatChunkChoice(
                index=index, delta=DeltaMessage(content=output.text), finish_reason=output.finish_reason
            )
            choice.logprobs = self._logprobs(request, output)
            if request.return_token_ids:
                choice.token_ids = list(output.token_ids)
            yield self._chunk(request, job, [choice])
        if request.include_usage:
            yield sse_event(
                ChatCompletionChunk(
                    id=job.request_id, created=job.created, model=request.model, choices=[], usage=job.usage
                )
            )
        yield SSE_DONE
