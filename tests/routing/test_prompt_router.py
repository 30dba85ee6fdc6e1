"""PromptRouter logic with the deterministic ``hashing`` stand-in encoder (no model)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import numpy as np
import pytest

from routing.config import KeywordRule, RoutesFile, RouteSpec, RoutingSettings
from routing.encoders import EncoderError, HashingEncoder, build_encoder, encoder_names
from routing.prompt_router import AsyncPromptRouter, PromptRouter

ROUTES = [
    RouteSpec(
        adapter="code",
        utterances=["python function returns list", "git commit branch merge", "compile error in module"],
        keywords=[KeywordRule(patterns=["traceback"])],
    ),
    RouteSpec(
        adapter="legal@stable",
        name="legal",
        utterances=["contract clause liability", "landlord tenant lease agreement"],
        keywords=[KeywordRule(operator="all", patterns=["hereinafter", "party"])],
    ),
    RouteSpec(adapter="medical", utterances=["patient fever symptoms", "blood pressure medication dose"]),
]


class CountingEncoder(HashingEncoder):
    """Counts the texts it is asked to encode and the threads it runs on."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.threads: set[str] = set()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.texts.extend(texts)
        self.threads.add(threading.current_thread().name)
        return super().encode(texts)


def make_router(encoder=None, routes=ROUTES, **settings) -> PromptRouter:
    settings = {"encoder": "hashing", "mode": "semantic", "threshold": 0.3, "top_k": 2, **settings}
    return PromptRouter(RoutingSettings(**settings), encoder or HashingEncoder(), RoutesFile(routes=list(routes)))


CASES = [
    # (text, route, target, method)
    ("Here is the Traceback I got", "code", "code", "keyword"),
    ("The party hereinafter called the Buyer", "legal", "legal@stable", "keyword"),
    ("the party was fun", None, None, "default"),  # 'all' rule needs both words; too far from every route
    ("my python function returns a list", "code", "code", "semantic"),
    ("patient with fever and symptoms", "medical", "medical", "semantic"),
    ("landlord lease agreement question", "legal", "legal@stable", "semantic"),
    ("zebra quantum pottery", None, None, "default"),
    ("", None, None, "default"),
]


@pytest.mark.parametrize(("text", "route", "target", "method"), CASES)
def test_route_decisions(text: str, route: str | None, target: str | None, method: str) -> None:
    decision = make_router().route(text)
    assert (decision.route, decision.target, decision.method) == (route, target, method)
    if method == "semantic":
        assert decision.score >= 0.3


def test_below_threshold_goes_to_the_configured_default_and_names_the_best_route() -> None:
    prompt_router = make_router(threshold=0.99, default="medical")
    decision = prompt_router.route("my python function returns a list")
    assert (decision.route, decision.target, decision.method, decision.best_route) == (
        None,
        "medical",
        "default",
        "code",
    )
    assert decision.score < 0.99


def test_per_route_threshold_overrides_the_default_threshold() -> None:
    strict = [ROUTES[0].model_copy(update={"threshold": 0.99}), *ROUTES[1:]]
    assert make_router().route("my python function returns a list").route == "code"
    assert make_router(routes=strict).route("my python function returns a list").route is None


def test_keyword_mode_never_encodes_prompts() -> None:
    encoder = CountingEncoder()
    prompt_router = make_router(encoder, mode="keyword")
    encoded_at_start = len(encoder.texts)
    assert prompt_router.route("my python function returns a list").method == "default"
    assert prompt_router.route("a traceback").route == "code"
    assert len(encoder.texts) == encoded_at_start


def test_hybrid_adds_the_sparse_signal() -> None:
    text = "python function"
    dense = make_router(mode="semantic").scores(text)["code"]
    hybrid = make_router(mode="hybrid", dense_weight=0.5).scores(text)["code"]
    sparse = make_router().table.sparse.scores(text)[0]
    assert sparse > 0
    assert hybrid == pytest.approx(0.5 * dense + 0.5 * sparse, abs=1e-5)


def test_utterance_embeddings_are_computed_once_and_reused_across_updates() -> None:
    encoder = CountingEncoder()
    prompt_router = make_router(encoder)
    n_utterances = sum(len(r.utterances) for r in ROUTES)
    assert len(encoder.texts) == n_utterances
    prompt_router.route("patient fever")  # one query
    new = RouteSpec(adapter="code", utterances=["python function returns list", "rust borrow checker"])
    assert prompt_router.put_route(new) is True  # replaced the code route
    assert encoder.texts[n_utterances + 1 :] == ["rust borrow checker"]  # only the new utterance


def test_put_and_delete_routes_take_effect() -> None:
    prompt_router = make_router()
    assert prompt_router.route("garden roses tulips bloom").route is None
    assert (
        prompt_router.put_route(RouteSpec(adapter="garden", utterances=["garden roses tulips", "flowers bloom"]))
        is False
    )
    assert prompt_router.route("garden roses tulips bloom").target == "garden"
    assert prompt_router.delete_route("garden") is True
    assert prompt_router.delete_route("garden") is False
    assert prompt_router.route("garden roses tulips bloom").route is None
    assert [s.key for s in prompt_router.table.specs] == ["code", "legal", "medical"]


async def test_async_router_encodes_off_the_event_loop() -> None:
    encoder = CountingEncoder()
    prompt_router = AsyncPromptRouter(make_router(encoder))
    try:
        encoder.threads.clear()
        decision = await prompt_router.route("patient with fever and symptoms")
        assert decision.route == "medical" and decision.latency_s > 0
        assert encoder.threads and all(name.startswith("prompt-router") for name in encoder.threads)
        assert (await prompt_router.route("a traceback")).method == "keyword"
        await prompt_router.put_route(RouteSpec(adapter="garden", utterances=["garden roses tulips"]))
        results = await asyncio.gather(*(prompt_router.route("garden roses tulips") for _ in range(5)))
        assert {r.target for r in results} == {"garden"}
    finally:
        prompt_router.close()


async def test_async_router_runs_the_keyword_layer_off_the_event_loop(monkeypatch) -> None:
    prompt_router = make_router()
    threads: list[str] = []
    keyword_route = prompt_router.table.keyword_route

    def recorded(text, allowed=None):
        threads.append(threading.current_thread().name)
        return keyword_route(text, allowed)

    monkeypatch.setattr(prompt_router.table, "keyword_route", recorded)
    async_prompt_router = AsyncPromptRouter(prompt_router)
    try:
        assert (await async_prompt_router.route("a traceback")).method == "keyword"
        assert threads and all(name.startswith("prompt-router") for name in threads)
    finally:
        async_prompt_router.close()


def test_encoder_registry() -> None:
    assert {"hashing", "minilm"} <= set(encoder_names())
    vectors = build_encoder("hashing").encode(["a b c", "a b c", "x y z"])
    assert vectors.shape == (3, HashingEncoder.dim)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0)
    assert np.allclose(vectors[0], vectors[1])
    with pytest.raises(EncoderError, match="unknown encoder 'nope'; known encoders: hashing, minilm"):
        build_encoder("nope")


@pytest.mark.parametrize(
    ("text", "allowed", "target"),
    [
        # a keyword match on a route the caller may not use falls through to the next layer
        ("The party hereinafter called the Buyer", {"code", "medical"}, None),
        ("The party hereinafter called the Buyer", {"legal@stable"}, "legal@stable"),
        # similarity only ranks the routes the caller may use
        ("landlord lease agreement question", {"code", "medical"}, None),
        ("patient with fever and symptoms", {"medical"}, "medical"),
        ("patient with fever and symptoms", set(), None),
    ],
)
def test_routing_considers_only_allowed_targets(text, allowed, target):
    prompt_router = make_router()

    def may_use(spec) -> bool:
        return spec.adapter in allowed

    decision = prompt_router.route(text, may_use)
    assert decision.target == target
    assert asyncio.run(AsyncPromptRouter(prompt_router).route(text, may_use)).target == target


def test_a_tenants_route_routes_only_that_tenant() -> None:
    private = RouteSpec(name="acme-code", adapter="code", tenant="acme", keywords=[{"patterns": ["zorblax"]}])
    prompt_router = make_router(routes=[*ROUTES, private])

    def caller(tenant: str | None):
        return lambda spec: spec.tenant in (None, tenant)

    assert prompt_router.route("a zorblax question", caller("acme")).target == "code"
    assert prompt_router.route("a zorblax question", caller("other")).method != "keyword"
