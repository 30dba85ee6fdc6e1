"""``build_app``: the FastAPI application and its lifespan."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from adapter_store import AdapterCatalog, AdapterStore
from serving.adapters import open_store
from serving.api.auth import AuthMiddleware, KeyStore
from serving.api.chat import api_router as chat_router
from serving.api.completions import api_router as completions_router
from serving.api.deps import AppState
from serving.api.errors import install_error_handlers
from serving.api.limits import BodySizeLimitMiddleware, RequestLimiter
from serving.api.models import api_router as models_router
from serving.api.system import api_router as system_router
from serving.config import Settings
from serving.engine import LoraEngine
from serving.metrics import AdapterMetrics

logger = logging.getLogger(__name__)

_ROUTERS = (system_router, models_router, completions_router, chat_router)


def build_state(settings: Settings, engine: LoraEngine, metrics: AdapterMetrics, store: AdapterStore) -> AppState:
    """Wire the serving objects around a started engine."""
    from serving.api.chat.serving import ChatServing
    from serving.api.completions.serving import CompletionServing
    from serving.api.models.serving import ModelsServing

    catalog = AdapterCatalog(store)
    tokenizer = engine.llm.get_tokenizer()
    limiter = RequestLimiter(settings.limits, settings.engine.max_num_seqs, metrics)
    shared = (engine, catalog, settings, metrics, tokenizer, limiter)
    return AppState(
        engine=engine,
        metrics=metrics,
        completions=CompletionServing(*shared),
        chat=ChatServing(*shared),
        models=ModelsServing(settings, catalog),
    )


def build_app(settings: Settings) -> FastAPI:
    """The application; the engine starts in the lifespan, before the port accepts connections."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with tempfile.TemporaryDirectory(prefix="loraserve-store-") as scratch:
            # Adapters are validated and registered before the engine starts: a bad one fails fast.
            store = open_store(settings, Path(scratch))
            engine = LoraEngine(settings)
            try:
                await engine.start()
                app.state.loraserve = build_state(settings, engine, AdapterMetrics(), store)
                names = ", ".join(store.registry.names()) or "none"
                logger.info("serving %s with adapters: %s", settings.model.name, names)
                yield
            finally:
                engine.shutdown()
                store.close()

    keys = KeyStore.from_settings(settings.auth)  # a bad keys file fails here, before the engine loads
    if keys is None:
        logger.warning("auth.mode is open: every caller may use every adapter and admin endpoint")
    app = FastAPI(title="loraserve", version="0.1.0", lifespan=lifespan)
    # The middleware added last runs first: authenticate before any body is read, then bound it.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.limits.max_body_bytes)
    app.add_middleware(AuthMiddleware, keys=keys)
    install_error_handlers(app)
    for router in _ROUTERS:
        router.attach_router(app)
    return app
