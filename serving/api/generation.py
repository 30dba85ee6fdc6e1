"""What the completion and chat endpoints share: admission by cost, model resolution,
sampling parameters, and one instrumented stream of engine outputs.

The endpoint classes only turn prompts into token ids and engine outputs into
their own response shapes. Tokenization (and chat templates) block on the CPU:
a request with a long prompt does all of its own in one worker thread, off the
event loop. A short one (up to :data:`INLINE_PROMPT_SIZE` characters or token
ids) is tokenized on the loop: that takes tens of microseconds, while the hop
to a thread and back costs more than that even on an idle machine, and up to
the interpreter's 5 ms switch interval per direction when the loop is busy
(measured: `results/HISTORY.md`, "Short requests: the gateway's cost per request").
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from adapter_store import ServedAdapter
from routing import AsyncPromptRouter, RouteDecision, RouteSpec
from serving.api.auth import Principal
from serving.api.disconnect import cancel_on_disconnect, event_stream
from serving.api.errors import EngineUnavailableError, ServingError
from serving.api.limits import RequestLimiter, request_cost
from serving.api.protocol import SamplingRequest, UsageInfo
from serving.api.sampling import sampling_params
from serving.api.selector import AdapterSelector
from serving.api.streams import merge_streams
from serving.config import Settings
from serving.engine import LoraEngine
from serving.metrics import BASE_LABEL, AdapterMetrics, RequestSeries

if TYPE_CHECKING:
    from vllm import CompletionOutput, SamplingParams

T = TypeVar("T")

INLINE_PROMPT_SIZE = 512
"""Prompts of at most this many characters (text) or token ids are tokenized on the event loop, not in a thread."""


@dataclass
class GenerationJob:
    """One API request after validation: what to run and how to account for it."""

    request_id: str
    model: str
    adapter: ServedAdapter | None
    prompts: list[list[int]]
    params: SamplingParams
    n: int
    series: RequestSeries
    created: int = field(default_factory=lambda: int(time.time()))
    arrival: float = field(default_factory=time.perf_counter)
    usage: UsageInfo = field(default_factory=UsageInfo)

    @property
    def label(self) -> str:
        return BASE_LABEL if self.adapter is None else self.adapter.name


def route_headers(decision: RouteDecision) -> dict[str, str]:
    return {
        "X-Routed-Adapter": decision.target or BASE_LABEL,
        "X-Route-Score": f"{decision.score:.4f}",
        "X-Route-Method": decision.method,
    }


class GenerationServing(ABC):
    """Base of the endpoint serving classes: prepare a job, then answer whole or streamed."""

    endpoint: str = ""
    request_prefix: str = "req"

    def __init__(
        self,
        engine: LoraEngine,
        selector: AdapterSelector,
        settings: Settings,
        metrics: AdapterMetrics,
        tokenizer: Any,
        limiter: RequestLimiter,
        prompt_router: AsyncPromptRouter | None = None,
    ) -> None:
        self.engine = engine
        self.selector = selector
        self.settings = settings
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.limiter = limiter
        self.prompt_router = prompt_router
        # Ids a client may send: the tokenizer's and the model's vocabularies can differ; vLLM takes either.
        self.vocab_size = max(tokenizer.max_token_id + 1, engine.llm.model_config.get_vocab_size())

    @abstractmethod
    async def prepare(self, request: Any, adapter: ServedAdapter | None) -> GenerationJob:
        """Tokenize (with :meth:`tokenize`) and validate for ``adapter`` (``None``: the base model).

        Raises before any engine work.
        """

    @staticmethod
    async def tokenize(work: Callable[[], T], size: int) -> T:
        """Run ``work`` (tokenization of a prompt of ``size`` characters or ids) inline if small, else in a thread."""
        if size <= INLINE_PROMPT_SIZE:
            return work()
        return await asyncio.to_thread(work)

    @abstractmethod
    def routing_text(self, request: Any) -> str:
        """The text the prompt router sees for ``model: auto`` (e.g. the last user message)."""

    @abstractmethod
    async def complete(self, request: Any, job: GenerationJob) -> BaseModel:
        """The whole response, once generation ends."""

    @abstractmethod
    def stream(self, request: Any, job: GenerationJob) -> AsyncIterator[str]:
        """Server-sent events, ending with ``data: [DONE]``."""

    async def respond(
        self, request: SamplingRequest, raw: Request, response: Response, principal: Principal
    ) -> BaseModel | StreamingResponse:
        """Serve one admitted request; the engine request is aborted if the client goes away.

        A request for the auto model is first routed among the adapters this
        caller may use: its ``model`` becomes the chosen adapter ref (or the base
        model's name) and is then resolved like any model a client names; the
        decision goes out in ``X-Route*`` headers.
        """
        cost = request_cost(request, self.settings.limits)
        permit = self.limiter.admit(principal, raw.client.host if raw.client else "-", cost)
        releases = [permit.release]

        def release() -> None:  # the permit and the adapter's lease end with the response
            while releases:
                releases.pop()()

        streaming = False
        try:
            decision = await self.route(request, principal)
            if decision is not None:
                request = request.model_copy(update={"model": decision.target or self.settings.model.name})
            resolution = await self.selector.acquire(request.model, principal)
            releases.append(lambda: self.selector.release(resolution))
            job = await self.prepare(request, resolution.adapter)
            headers = (
                dict(resolution.headers) if decision is None else {**route_headers(decision), **resolution.headers}
            )
            if request.stream:
                stream = await event_stream(self.stream(request, job), on_close=release)
                streaming = True
                stream.headers.update(headers)
                return stream
            result = await cancel_on_disconnect(raw, self.complete(request, job))
            response.headers.update(headers)
            return result
        finally:
            if not streaming:
                release()

    async def route(self, request: SamplingRequest, principal: Principal) -> RouteDecision | None:
        """The prompt router's decision for a request naming the auto model; ``None`` for any other model."""
        if (
            self.prompt_router is None
            or self.settings.routing is None
            or request.model != self.settings.routing.auto_model
        ):
            return None

        def may_target(target: str) -> bool:
            return self.selector.may_use(principal, target.partition("@")[0])

        def allowed(spec: RouteSpec) -> bool:  # the route's own tenant, and its target's
            return principal.may_use(spec.tenant) and may_target(spec.adapter)

        decision = await self.prompt_router.route(self.routing_text(request), allowed)
        if decision.target is not None and not may_target(decision.target):  # a default this caller may not use
            decision = dataclasses.replace(decision, target=None)
        self.metrics.routing_decisions.labels(decision.target or BASE_LABEL, decision.method).inc()
        self.metrics.routing_latency.labels(decision.method).observe(decision.latency_s)
        return decision

    def new_job(
        self,
        request: SamplingRequest,
        adapter: ServedAdapter | None,
        prompts: list[list[int]],
        max_tokens: int,
        logprobs: int | None,
    ) -> GenerationJob:
        series = self.metrics.series(BASE_LABEL if adapter is None else adapter.name, self.endpoint)
        series.requests.inc()
        return GenerationJob(
            request_id=f"{self.request_prefix}-{uuid.uuid4().hex}",
            model=request.model,
            adapter=adapter,
            prompts=prompts,
            params=sampling_params(request, max_tokens, logprobs, request.stream),
            n=request.n,
            series=series,
        )

    def _note_resident(self, adapter: ServedAdapter, series: RequestSeries) -> bool:
        """Replay the engine's host-cache LRU for the metrics; whether the adapter was resident."""
        hit, evicted = self.engine.resident.use(adapter)
        (series.memory_hits if hit else series.memory_misses).inc()
        for gone in evicted:
            self.metrics.adapter_evictions.labels(gone.name, "memory").inc()
        return hit

    def count_error(self, label: str, error: ServingError) -> None:
        self.metrics.errors.labels(label, error.code or error.type).inc()

    async def outputs(self, job: GenerationJob) -> AsyncIterator[tuple[int, CompletionOutput]]:
        """Engine outputs as ``(choice index, output)``, with metrics and usage kept.

        Choice ``i * n + j`` is sample ``j`` of prompt ``i``. Cancelling the
        iterator (client gone) aborts every engine request behind it.
        """
        if not self.engine.ready:
            raise EngineUnavailableError("The engine is not running; retry later.")
        streams = [
            self.engine.generate(ids, job.params, f"{job.request_id}-{i}", job.adapter)
            for i, ids in enumerate(job.prompts)
        ]
        job.usage.prompt_tokens = sum(len(p) for p in job.prompts)
        loading = job.adapter is not None and not self._note_resident(job.adapter, job.series)
        first_token_seen = False
        finished = False
        # One prompt (nearly every request): its stream directly, not through merge_streams (a generator layer
        # per token); several: merged, each output with its prompt's index.
        single = len(streams) == 1
        source: AsyncIterator[Any] = streams[0] if single else merge_streams(streams)
        try:
            async for entry in source:
                prompt_index, request_output = (0, entry) if single else entry
                for output in request_output.outputs:
                    if output.token_ids and not first_token_seen:
                        first_token_seen = True
                        ttft = time.perf_counter() - job.arrival
                        job.series.time_to_first_token.observe(ttft)
                        if loading:
                            self.metrics.adapter_load_latency.labels(job.label, "memory").observe(ttft)
                    job.usage.completion_tokens += len(output.token_ids)
                    yield prompt_index * job.n + output.index, output
            finished = True
        except (asyncio.CancelledError, GeneratorExit):
            self.metrics.aborts.labels(job.label).inc()
            raise
        except ServingError as e:
            self.count_error(job.label, e)
            raise
        except Exception as e:
            if not self.engine.ready:
                error = EngineUnavailableError(f"The engine failed while serving the request: {type(e).__name__}.")
                self.count_error(job.label, error)
                raise error from e
            self.metrics.errors.labels(job.label, "internal_error").inc()
            raise
        finally:
            job.usage.total_tokens = job.usage.prompt_tokens + job.usage.completion_tokens
            if finished:
                job.series.prompt_tokens.inc(job.usage.prompt_tokens)
                job.series.completion_tokens.inc(job.usage.completion_tokens)
                job.series.e2e_latency.observe(time.perf_counter() - job.arrival)
