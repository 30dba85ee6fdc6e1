"""``build_app``: the FastAPI application and its lifespan."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from prometheus_client import REGISTRY

from adapter_store import AdapterStore
from routing import AsyncRouter, Router, build_encoder, load_routes
from serving.api.adapters import api_router as adapters_router
from serving.api.auth import OPEN_PRINCIPAL, AuthMiddleware, KeyStore
from serving.api.chat import api_router as chat_router
from serving.api.completions import api_router as completions_router
from serving.api.deps import AppState
from serving.api.errors import ServingError, install_error_handlers
from serving.api.limits import BodySizeLimitMiddleware, RequestLimiter
from serving.api.models import api_router as models_router
from serving.api.routes import api_router as routes_router
from serving.api.selector import AdapterSelector
from serving.api.system import api_router as system_router
from serving.config import ConfigError, Settings
from serving.engine import LoraEngine
from serving.metrics import AdapterMetrics, AdapterStoreCollector
from serving.store import open_store

logger = logging.getLogger(__name__)

_ROUTERS = (system_router, models_router, completions_router, chat_router, routes_router, adapters_router)


def build_router(settings: Settings) -> AsyncRouter | None:
    """The prompt router (encoder loaded, utterances embedded), or ``None`` without a routing section."""
    if settings.routing is None:
        return None
    return AsyncRouter(Router(settings.routing, build_encoder(settings.routing.encoder), load_routes(settings.routing)))


def build_state(
    settings: Settings, engine: LoraEngine, metrics: AdapterMetrics, store: AdapterStore, router: AsyncRouter | None
) -> AppState:
    """Wire the serving objects around a started engine."""
    from serving.api.adapters.probe import AdapterProbe
    from serving.api.adapters.serving import AdaptersServing
    from serving.api.chat.serving import ChatServing
    from serving.api.completions.serving import CompletionServing
    from serving.api.models.serving import ModelsServing
    from serving.api.routes.serving import RoutesServing

    selector = AdapterSelector(settings, store, metrics, engine)
    tokenizer = engine.llm.get_tokenizer()
    limiter = RequestLimiter(settings.limits, settings.engine.max_num_seqs, metrics)
    shared = (engine, selector, settings, metrics, tokenizer, limiter, router)

    def resolve_any(ref: str) -> object:  # route targets are checked as the operator sees them: everything
        selector.require(ref, OPEN_PRINCIPAL)  # found on demand: registered as public
        return ref

    if router is not None:  # every route and the default must name a served model, checked like a client's
        targets = [s.adapter for s in router.router.table.specs] + [settings.routing.default or settings.model.name]
        for target in targets:
            try:
                resolve_any(target)
            except ServingError as e:
                raise ConfigError(f"routing refers to a model that is not served: {e.message}") from e
    return AppState(
        engine=engine,
        metrics=metrics,
        completions=CompletionServing(*shared),
        chat=ChatServing(*shared),
        models=ModelsServing(settings, selector),
        routes=RoutesServing(settings, router, resolve_any),
        adapters=AdaptersServing(engine, selector, AdapterProbe(engine, store, tokenizer), limiter),
    )


def build_app(settings: Settings) -> FastAPI:
    """The application; the engine starts in the lifespan, before the port accepts connections."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with tempfile.TemporaryDirectory(prefix="loraserve-store-") as scratch:
            # Adapters are validated and registered before the engine starts: a bad one fails fast.
            store = open_store(settings, Path(scratch))
            prompt_router = collector = None
            engine = LoraEngine(settings)
            try:
                prompt_router = build_router(settings)
                await engine.start()
                # In a worker thread: checking the routes' targets reads (and may fetch into) the store.
                state = await asyncio.to_thread(build_state, settings, engine, AdapterMetrics(), store, prompt_router)
                await state.adapters.probe.startup([a.name for a in settings.adapters])
                collector = AdapterStoreCollector(store, engine.resident)
                REGISTRY.register(collector)
                app.state.loraserve = state
                names = ", ".join(await asyncio.to_thread(store.names)) or "none"
                logger.info("serving %s with adapters: %s", settings.model.name, names)
                yield
            finally:
                if collector is not None:
                    REGISTRY.unregister(collector)
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
    for router in _ROUTERS:
        router.attach_router(app)
    return app
