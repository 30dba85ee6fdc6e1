"""Prompt → adapter: the keyword layer, then the semantic (dense or hybrid) layer, then the default.

A :class:`RouteTable` is an immutable snapshot of the routes with their
utterance embeddings; changing a route builds a new table (embedding only the
new utterances, the rest come from the cache) and swaps it in, so a request
never sees half an update.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from routing.config import Calibration, RoutesFile, RouteSpec, RoutingSettings, check_unique_keys
from routing.encoders import Encoder
from routing.keywords import KeywordMatcher
from routing.sparse import TfidfIndex

METHOD_KEYWORD = "keyword"
METHOD_DEFAULT = "default"
"""Nothing matched with enough confidence: the configured default (the base model unless set)."""


@dataclass(frozen=True)
class RouteDecision:
    """What the prompt router chose and why.

    ``target`` is the adapter ref to serve (``None``: the base model); ``route``
    the route that decided (``None`` when none did); ``score`` the winning (or
    best, when below threshold) route score; ``method`` one of ``keyword``,
    ``semantic``, ``hybrid``, ``default``.
    """

    target: str | None
    route: str | None
    score: float
    method: str
    confidence: float | None = None
    best_route: str | None = None
    latency_s: float = 0.0


class EmbeddingCache:
    """Utterance embeddings by text, so each is computed once per encoder; thread-safe."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self._vectors: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        if missing:
            fresh = self.encoder.encode(missing)
            with self._lock:
                self._vectors.update(zip(missing, fresh))
        with self._lock:
            return np.stack([self._vectors[t] for t in texts]) if texts else np.zeros((0, 0), np.float32)

    def __len__(self) -> int:
        return len(self._vectors)


# Whether a caller may be routed by a route (its own tenant, its target's); the server passes the key's checks.
Allowed = Callable[[RouteSpec], bool]
_T = TypeVar("_T")


@dataclass(frozen=True)
class _Route:
    spec: RouteSpec
    keywords: KeywordMatcher
    utterances: np.ndarray  # (n_utterances, dim) unit vectors
    threshold: float


class RouteTable:
    """The routes of one moment, ready to score."""

    def __init__(self, routes: list[_Route], settings: RoutingSettings) -> None:
        self.routes = routes
        self.settings = settings
        documents = [" ".join([*r.spec.utterances, *(p for k in r.spec.keywords for p in k.patterns)]) for r in routes]
        self.sparse = TfidfIndex(documents)

    @property
    def specs(self) -> list[RouteSpec]:
        return [r.spec for r in self.routes]

    def keyword_route(self, text: str, allowed: Allowed | None = None) -> _Route | None:
        """The first route (in order) that ``allowed`` admits and whose keyword rules all hold."""
        if not text:
            return None
        return next((r for r in self.routes if (allowed is None or allowed(r.spec)) and r.keywords.matches(text)), None)

    def dense_scores(self, query: np.ndarray) -> np.ndarray:
        """Per route: the mean of its ``top_k`` best cosine similarities to ``query``."""
        out = np.full(len(self.routes), -1.0, dtype=np.float32)
        for i, route in enumerate(self.routes):
            if route.utterances.shape[0]:
                sims = route.utterances @ query
                k = min(self.settings.top_k, sims.shape[0])
                out[i] = float(np.mean(np.partition(sims, -k)[-k:]))
        return out

    def scores(self, text: str, query: np.ndarray) -> np.ndarray:
        dense = self.dense_scores(query)
        if self.settings.mode != "hybrid":
            return dense
        w = self.settings.dense_weight
        return w * dense + (1.0 - w) * self.sparse.scores(text)


class PromptRouter:
    """Synchronous routing; :class:`AsyncPromptRouter` runs it off the event loop."""

    def __init__(self, settings: RoutingSettings, encoder: Encoder, routes: RoutesFile) -> None:
        self.settings = settings
        self.cache = EmbeddingCache(encoder)
        self.calibration: Calibration | None = routes.calibration
        self._lock = threading.Lock()
        self.table = self._build(list(routes.routes))

    # ---- routes -------------------------------------------------------------------------------
    def _build(self, specs: list[RouteSpec]) -> RouteTable:
        check_unique_keys(specs)
        compiled = [
            _Route(
                spec=spec,
                keywords=KeywordMatcher.compile(spec.keywords),
                utterances=self.cache.embed(spec.utterances) if spec.utterances else np.zeros((0, 0), np.float32),
                threshold=spec.threshold if spec.threshold is not None else self.settings.threshold,
            )
            for spec in specs
        ]
        return RouteTable(compiled, self.settings)

    def put_route(self, spec: RouteSpec) -> bool:
        """Add ``spec``, or replace the route with its key; True when it replaced one."""
        with self._lock:
            specs = self.table.specs
            keys = [s.key for s in specs]
            replaced = spec.key in keys
            specs = [spec if s.key == spec.key else s for s in specs] if replaced else [*specs, spec]
            self.table = self._build(specs)
            return replaced

    def delete_route(self, key: str) -> bool:
        """Remove the route ``key``; False when there is none."""
        with self._lock:
            specs = self.table.specs
            if key not in {s.key for s in specs}:
                return False
            self.table = self._build([s for s in specs if s.key != key])
            return True

    # ---- routing ------------------------------------------------------------------------------
    def route_by_keywords(self, text: str, allowed: Allowed | None = None) -> RouteDecision | None:
        """The keyword layer alone (RE2, bounded text: microseconds to a millisecond); ``None`` when no rule holds."""
        start = time.perf_counter()
        route = self.table.keyword_route(text, allowed)
        if route is None:
            return None
        confidence = self.calibration.keyword_precision if self.calibration else None
        return RouteDecision(
            target=route.spec.adapter,
            route=route.spec.key,
            score=1.0,
            method=METHOD_KEYWORD,
            confidence=confidence,
            best_route=route.spec.key,
            latency_s=time.perf_counter() - start,
        )

    def route_by_similarity(self, text: str, allowed: Allowed | None = None) -> RouteDecision:
        """The semantic layer (dense or hybrid), falling back to the default below threshold.

        Routes that ``allowed`` refuses (another tenant's adapters) are not candidates.
        """
        start = time.perf_counter()
        table = self.table
        usable = [allowed is None or allowed(r.spec) for r in table.routes]
        if self.settings.mode == "keyword" or not any(usable) or not text.strip():
            return self._default(None, -1.0, None, start)
        query = self.cache.encoder.encode([text])[0]
        scores = np.where(usable, table.scores(text, query), -np.inf)
        best = int(np.argmax(scores))
        route, score = table.routes[best], float(scores[best])
        confidence = self._confidence(score - route.threshold)
        if score < route.threshold:
            return self._default(route.spec.key, score, None if confidence is None else 1.0 - confidence, start)
        return RouteDecision(
            target=route.spec.adapter,
            route=route.spec.key,
            score=score,
            method=self.settings.mode,
            confidence=confidence,
            best_route=route.spec.key,
            latency_s=time.perf_counter() - start,
        )

    def route(self, text: str, allowed: Allowed | None = None) -> RouteDecision:
        return self.route_by_keywords(text, allowed) or self.route_by_similarity(text, allowed)

    def scores(self, text: str) -> dict[str, float]:
        """Every route's similarity score for ``text`` (calibration and debugging)."""
        table = self.table
        query = self.cache.encoder.encode([text])[0]
        return dict(zip((r.spec.key for r in table.routes), map(float, table.scores(text, query))))

    def _confidence(self, margin: float) -> float | None:
        if self.calibration is None:
            return None
        z = self.calibration.platt_a * margin + self.calibration.platt_b
        return 1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0)))

    def _default(self, best: str | None, score: float, confidence: float | None, start: float) -> RouteDecision:
        return RouteDecision(
            target=self.settings.default,
            route=None,
            score=score,
            method=METHOD_DEFAULT,
            confidence=confidence,
            best_route=best,
            latency_s=time.perf_counter() - start,
        )


class AsyncPromptRouter:
    """The prompt router for an event loop: both layers in one worker thread, one hop per request.

    The keyword layer runs there too: its patterns are linear-time and see a
    bounded text, but on a long prompt and many rules it is still CPU work the
    event loop should not wait for. One worker, because the encoder runs with
    one torch thread and requests would only queue for the same core anyway;
    route changes (which encode new utterances) go through the same worker.
    """

    def __init__(self, prompt_router: PromptRouter) -> None:
        self._sync = prompt_router
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prompt-router")

    @property
    def table(self) -> RouteTable:
        """The current routes: an immutable snapshot, safe to read from the event loop."""
        return self._sync.table

    async def route(self, text: str, allowed: Allowed | None = None) -> RouteDecision:
        start = time.perf_counter()
        decision = await self._run(self._sync.route, text, allowed)
        return dataclasses.replace(decision, latency_s=time.perf_counter() - start)

    async def put_route(self, spec: RouteSpec) -> bool:
        return await self._run(self._sync.put_route, spec)

    async def delete_route(self, key: str) -> bool:
        return await self._run(self._sync.delete_route, key)

    async def _run(self, fn: Callable[..., _T], *args: object) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
