"""Shared objects, built once in the lifespan, reached through ``Annotated`` dependencies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from serving.api.adapters.serving import AdaptersServing
from serving.api.chat.serving import ChatServing
from serving.api.completions.serving import CompletionServing
from serving.api.models.serving import ModelsServing
from serving.api.routes.serving import RoutesServing
from serving.engine import LoraEngine
from serving.metrics import AdapterMetrics


@dataclass
class AppState:
    """Everything the routes need; stored as ``app.state.loraserve``."""

    engine: LoraEngine
    metrics: AdapterMetrics
    completions: CompletionServing
    chat: ChatServing
    models: ModelsServing
    routes: RoutesServing
    adapters: AdaptersServing


def app_state(request: Request) -> AppState:
    return request.app.state.loraserve


def _engine(request: Request) -> LoraEngine:
    return app_state(request).engine


def _completions(request: Request) -> CompletionServing:
    return app_state(request).completions


def _chat(request: Request) -> ChatServing:
    return app_state(request).chat


def _models(request: Request) -> ModelsServing:
    return app_state(request).models


def _routes(request: Request) -> RoutesServing:
    return app_state(request).routes


def _adapters(request: Request) -> AdaptersServing:
    return app_state(request).adapters


EngineDep = Annotated[LoraEngine, Depends(_engine)]
CompletionServingDep = Annotated[CompletionServing, Depends(_completions)]
ChatServingDep = Annotated[ChatServing, Depends(_chat)]
ModelsServingDep = Annotated[ModelsServing, Depends(_models)]
RoutesServingDep = Annotated[RoutesServing, Depends(_routes)]
AdaptersServingDep = Annotated[AdaptersServing, Depends(_adapters)]
