"""Prompt → adapter routing (``model: "auto"``): keyword rules, then sentence-embedding similarity, then a default.

It owns the routes file and its settings (``config``), the keyword matcher
(``keywords``, linear-time RE2), the sentence encoders (``encoders``), the
prompt router itself (``router``) and its offline tools (``calibrate``,
``evaluate``, the ``loraserve routes`` commands in ``cli``). The server hands
it text and gets back an adapter ref (a name, or ``name@alias``) to resolve
like any client-sent model. It is a library: it never imports vLLM or FastAPI,
nor anything of ``serving``, ``checkpoints`` or ``loadtests``
(``tests/test_boundaries.py``).
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
