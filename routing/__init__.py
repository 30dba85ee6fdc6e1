"""Prompt → adapter routing: keyword rules, then sentence-embedding similarity, then a default.

Never imports vLLM or FastAPI; the server hands it text and gets back an
adapter ref (a name, or ``name@alias``) to resolve like any client-sent model.
"""

from routing.config import KeywordRule, RoutesFile, RouteSpec, RoutingSettings, load_routes
from routing.encoders import Encoder, build_encoder, register_encoder
from routing.prompt_router import AsyncPromptRouter, PromptRouter, RouteDecision

__all__ = [
    "AsyncPromptRouter",
    "Encoder",
    "KeywordRule",
    "RouteDecision",
    "RouteSpec",
    "PromptRouter",
    "RoutesFile",
    "RoutingSettings",
    "build_encoder",
    "load_routes",
    "register_encoder",
]
