"""``build_app``: the FastAPI application and its lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from adapter_store import AdapterCatalog
from serving.api.chat import api_router as chat_router
from serving.api.completions import api_router as completions_router
from serving.api.deps import AppState
from serving.api.errors import ServingError, install_error_handlers
from serving.api.models import api_router as models_router
from serving.api.routes import api_router as routes_router
from serving.api.system import api_router as system_router
from routing import AsyncRouter, Router, build_encoder, load_routes
from serving.config import ConfigError, Settings
from serving.engine import LoraEngine
from serving.metrics import AdapterMetrics

logger = logging.getLogger(__name__)

_ROUTERS = (system_router, models_router, completions_router, chat_router, routes_router)


def build_router(settings: Settings) -> AsyncRouter | None:
    """The prompt router (encoder loaded, utterances embedded), or ``None`` without a routing section."""
    if settings.routing is None:
        return None
    return AsyncRouter(Router(settings.routing, build_encoder(settings.routing.encoder), load_routes(settings.routing)))


def build_state(settings: Settings, engine: LoraEngine, metrics: AdapterMetrics, router: AsyncRouter | None) -> AppState:
    """Wire the serving objects around a started engine."""
    from serving.api.chat.serving import ChatServing
    from serving.api.completions.serving import CompletionServing
    from serving.api.models.serving import ModelsServing
    from serving.api.routes.serving import RoutesServing

    catalog = AdapterCatalog((a.name, a.path) for a in settings.adapters)
    tokenizer = engine.llm.get_tokenizer()
    shared = (engine, catalog, settings, metrics, tokenizer)
    completions = CompletionServing(*shared, router=router)
    if router is not None:  # every route and the default must name a served model, checked like a client's
        targets = [s.adapter for s in router.router.table.specs] + [settings.routing.default or settings.model.name]
        for target in targets:
            try:
                completions.resolve_model(target)
            except ServingError as e:
                raise ConfigError(f"routing refers to a model that is not served: {e.message}") from e
    return AppState(
        engine=engine,
        completions=completions,
        chat=ChatServing(*shared, router=router),
        models=ModelsServing(settings, catalog),
        routes=RoutesServing(settings, router, completions.resolve_model),
    )


def build_app(settings: Settings) -> FastAPI:
    """The application; the engine starts in the lifespan, before the port accepts connections."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        prompt_router = build_router(settings)
        engine = LoraEngine(settings)
        await engine.start()
        try:
            app.state.loraserve = build_state(settings, engine, AdapterMetrics(), prompt_router)
            logger.info(
                "serving %s with adapters: %s", settings.model.name, ", ".join(a.name for a in settings.adapters) or "none"
            )
            yield
        finally:
            engine.shutdown()
            if prompt_router is not None:
                prompt_router.close()

    app = FastAPI(title="loraserve", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    for router in _ROUTERS:
        router.attach_router(app)
    return app
