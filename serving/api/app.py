"""``build_app``: the FastAPI application and its lifespan; the API's one composition root.

Only this module knows every endpoint package: :func:`init_app_state` builds
their serving objects onto ``app.state`` and ``_API_ROUTERS`` attaches their routes.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from prometheus_client import REGISTRY
from prometheus_client.registry import Collector
from starlette.datastructures import State

from adapter_store import AdapterStore
from routing import AsyncPromptRouter, PromptRouter, build_encoder, load_routes
from serving.api.adapters import api_router as adapters_api
from serving.api.adapters.fleet import FleetEvents
from serving.api.adapters.probe import AdapterProbe
from serving.api.adapters.serving import AdaptersServing
from serving.api.auth import OPEN_PRINCIPAL, AuthMiddleware, KeyStore
from serving.api.chat import api_router as chat_api
from serving.api.chat.serving import ChatServing
from serving.api.completions import api_router as completions_api
from serving.api.completions.serving import CompletionServing
from serving.api.errors import ServingError, install_error_handlers
from serving.api.limits import BodySizeLimitMiddleware, RequestLimiter
from serving.api.models import api_router as models_api
from serving.api.models.serving import ModelsServing
from serving.api.prompt_routes import api_router as prompt_routes_api
from serving.api.prompt_routes.serving import PromptRoutesServing
from serving.api.selector import AdapterSelector
from serving.api.system import api_router as system_api
from serving.config import ConfigError, Settings
from serving.engine import LoraEngine
from serving.metrics import (
    AdapterMetrics,
    AdapterStoreCollector,
    EngineSizingCollector,
    FairSchedulerCollector,
    StoreViewer,
)
from serving.store import open_store

logger = logging.getLogger(__name__)

_API_ROUTERS = (system_api, models_api, completions_api, chat_api, prompt_routes_api, adapters_api)


def build_prompt_router(settings: Settings) -> AsyncPromptRouter | None:
    """The prompt router (encoder loaded, utterances embedded), or ``None`` without a routing section."""
    if settings.routing is None:
        return None
    routing = settings.routing
    return AsyncPromptRouter(PromptRouter(routing, build_encoder(routing.encoder), load_routes(routing)))


def init_app_state(
    state: State,
    settings: Settings,
    engine: LoraEngine,
    metrics: AdapterMetrics,
    store: AdapterStore,
    prompt_router: AsyncPromptRouter | None,
) -> None:
    """Wire the serving objects around a started engine, onto ``app.state``.

    This is the one place that knows every endpoint package: each package's
    ``api_router`` reads its own serving object back from ``app.state`` (as
    vLLM's OpenAI server does), so no shared module imports an endpoint. It
    blocks (checking the routes' targets reads, and may fetch into, the store):
    call it in a worker thread.
    """
    selector = AdapterSelector(settings, store, metrics, engine)
    tokenizer = engine.llm.get_tokenizer()
    limiter = RequestLimiter(settings.limits, settings.engine.max_num_seqs, metrics)
    shared = (engine, selector, settings, metrics, tokenizer, limiter, prompt_router)

    def resolve_any(ref: str) -> object:  # route targets are checked as the operator sees them: everything
        selector.require(ref, OPEN_PRINCIPAL)  # found on demand: registered as public
        return ref

    if prompt_router is not None and settings.routing is not None:  # routes and the default must be served models
        targets = [s.adapter for s in prompt_router.table.specs] + [settings.routing.default or settings.model.name]
        for target in targets:
            try:
                resolve_any(target)
            except ServingError as e:
                raise ConfigError(f"routing refers to a model that is not served: {e.message}") from e
    state.engine = engine
    state.metrics = metrics
    state.completion_serving = CompletionServing(*shared)
    state.chat_serving = ChatServing(*shared)
    state.models_serving = ModelsServing(settings, store)
    state.prompt_routes_serving = PromptRoutesServing(settings, prompt_router, resolve_any)
    state.adapters_serving = AdaptersServing(engine, selector, AdapterProbe(engine, store, tokenizer), limiter)


def freeze_startup_heap() -> int:
    """Take every object alive after start-up out of the garbage collector's scans; returns how many.

    vLLM, transformers, torch and the app leave ~750,000 tracked objects in
    this process, nearly all alive until it exits. A full collection, which
    the collector runs every time enough request objects have outlived two
    younger collections, scans them all: ~0.4 s of the event loop, while every
    stream waits. Frozen, they are no longer scanned (refcounting still frees
    them). vLLM's engine core does the same for its own heap
    (``vllm.utils.gc_utils.freeze_gc_heap``); its API server does not.
    """
    gc.collect()  # start-up's garbage goes first: frozen cycles would never be collected
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info("froze %d start-up objects out of the garbage collector's scans", frozen)
    return frozen


def build_app(settings: Settings) -> FastAPI:
    """The application; the engine starts in the lifespan, before the port accepts connections."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with tempfile.TemporaryDirectory(prefix="loraserve-store-") as scratch:
            # Adapters are validated and registered before the engine starts: a bad one fails fast.
            store = open_store(settings, Path(scratch))
            prompt_router = None
            collectors: list[Collector] = []
            engine = LoraEngine(settings)
            watchers: list[asyncio.Task[None]] = []
            try:
                await engine.start()  # before the router's encoder runs torch: the engine core may fork (engine_fork)
                prompt_router = build_prompt_router(settings)
                watchers.append(asyncio.create_task(engine.watch_residency()))  # sees the start-up loads below
                metrics = AdapterMetrics()
                await asyncio.to_thread(init_app_state, app.state, settings, engine, metrics, store, prompt_router)
                adapters: AdaptersServing = app.state.adapters_serving
                fleet = FleetEvents(engine, store, adapters.probe, asyncio.get_running_loop())
                fleet.subscribe()  # before start-up reads the pins: a pin made meanwhile is an event
                watchers.append(asyncio.create_task(fleet.run()))
                await adapters.probe.startup([a.name for a in settings.adapters])
                viewer = StoreViewer(store)
                await asyncio.to_thread(viewer.refresh)  # the first scrape shows the store as started
                watchers.append(asyncio.create_task(viewer.run()))
                engine_views = (AdapterStoreCollector(viewer, engine), EngineSizingCollector(engine.sizing))
                for collector in (*engine_views, FairSchedulerCollector(engine)):
                    REGISTRY.register(collector)
                    collectors.append(collector)  # registered: unregistered on the way out
                names = ", ".join(await asyncio.to_thread(store.names)) or "none"
                logger.info("serving %s with adapters: %s", settings.model.name, names)
                freeze_startup_heap()
                yield
            finally:
                for watcher in watchers:
                    watcher.cancel()
                await asyncio.gather(*watchers, return_exceptions=True)
                for registered in collectors:
                    REGISTRY.unregister(registered)
                engine.shutdown()
                store.close()
                if prompt_router is not None:
                    prompt_router.close()

    keys = KeyStore.from_settings(settings.auth)  # a bad keys file fails here, before the engine loads
    if keys is None:
        logger.warning("auth.mode is open: every caller may use every adapter and admin endpoint")
    app = FastAPI(title="loraserve", version="0.1.0", lifespan=lifespan)
    # The middleware added last runs first: authenticate before any body is read, then bound it.
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_bytes=settings.limits.max_body_bytes,
        max_upload_bytes=settings.limits.max_upload_bytes,
    )
    app.add_middleware(AuthMiddleware, keys=keys)
    install_error_handlers(app)
    for api in _API_ROUTERS:
        api.attach_router(app)
    return app
