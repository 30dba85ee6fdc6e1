"""Serving's own health probe (``AdapterProbe``) against a real store and a stand-in engine.

The engine stand-in generates what each case needs (good tokens, NaN
log-probabilities, too few tokens, a refused load, a dead engine), so every
verdict of the probe is checked without starting vLLM; the real engine path is
in tests/e2e/test_adapter_admin.py.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from adapter_store import AdapterStore, ServedAdapter
from serving.api.adapters.probe import PROBE_TOKENS, AdapterProbe
from serving.api.errors import EngineUnavailableError
from serving.config import load_settings
from serving.engine import AdapterLoadFailed
from serving.store import open_store
from tests.adapter_store.helpers import write_adapter
from tests.serving.test_store import write_config


@dataclass
class FakeEngine:
    """``ensure_loaded``/``load``/``generate``/``ready`` as the probe uses them; ``logprobs`` is what it generates."""

    logprobs: list[float] = field(default_factory=lambda: [-0.5] * PROBE_TOKENS)
    refuse: bool = False
    dead: bool = False
    ready: bool = True
    params: list[Any] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)

    async def ensure_loaded(self, adapter: ServedAdapter) -> None:
        if self.refuse:
            raise AdapterLoadFailed("Call to add_lora method failed: bad shape")

    async def load(self, adapter: ServedAdapter) -> None:
        self.loaded.append(adapter.name)

    async def generate(self, ids: list[int], params: Any, request_id: str, adapter: ServedAdapter) -> AsyncIterator:
        self.params.append(params)
        if self.dead:
            self.ready = False
            raise RuntimeError("EngineDeadError")
        tokens = list(range(len(self.logprobs)))
        steps = [{t: SimpleNamespace(logprob=v)} for t, v in zip(tokens, self.logprobs, strict=True)]
        yield SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens, logprobs=steps)])


class Tokenizer:
    def encode(self, text: str) -> list[int]:
        return [1, 2, 3]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AdapterStore]:
    write_adapter(tmp_path / "volume" / "code", seed=1)
    section = {"root": "store", "sources": [{"type": "local", "roots": ["volume"]}], "pinned": []}
    store = open_store(load_settings(write_config(tmp_path, section, [])), tmp_path / "unused")
    store.register(str(tmp_path / "volume" / "code"), "code")
    yield store
    store.close()


def gone(store: AdapterStore) -> None:
    """No cached copy and no source left: the probe cannot even lease the files."""
    version = store.version("code")
    store._cache.remove(version.version)  # white-box: as if evicted
    shutil.rmtree(Path(version.source))


CASES = [  # (engine, store damage, health state, start of the recorded reason)
    (FakeEngine(), None, "ok", None),
    (FakeEngine(logprobs=[-0.5, math.nan, -0.5, -0.5]), None, "failed", "ProbeFailed: non-finite log-probabilities"),
    (FakeEngine(logprobs=[-0.5, -0.5]), None, "failed", f"ProbeFailed: expected {PROBE_TOKENS} tokens, got 2"),
    (FakeEngine(refuse=True), None, "failed", "AdapterLoadFailed: Call to add_lora method failed: bad shape"),
    (FakeEngine(), gone, "failed", "SourceError: "),
]


@pytest.mark.parametrize(("engine", "damage", "state", "reason"), CASES)
async def test_probe_records_its_verdict(store: AdapterStore, engine: FakeEngine, damage, state: str, reason) -> None:
    if damage is not None:
        damage(store)
    version = store.version("code")
    record = await AdapterProbe(engine, store, Tokenizer()).probe(version)  # type: ignore[arg-type]
    assert record == store.health("code", version.version)  # recorded in the registry, as returned
    assert record.state == state and record.latency_s is not None and record.latency_s > 0
    assert (record.reason is None) if reason is None else record.reason.startswith(reason)
    store.delete("code")  # not AdapterInUse: the probe released its lease whatever happened


async def test_probe_generates_greedily_through_the_one_sampling_builder(store: AdapterStore) -> None:
    engine = FakeEngine()
    await AdapterProbe(engine, store, Tokenizer()).probe(store.version("code"))  # type: ignore[arg-type]
    (params,) = engine.params
    assert (params.temperature, params.max_tokens, params.logprobs, params.ignore_eos) == (0.0, PROBE_TOKENS, 0, True)


async def test_a_dead_engine_is_a_503_and_the_adapter_is_not_blamed(store: AdapterStore) -> None:
    version = store.version("code")
    with pytest.raises(EngineUnavailableError, match="retry the check later"):
        await AdapterProbe(FakeEngine(dead=True), store, Tokenizer()).probe(version)  # type: ignore[arg-type]
    assert store.health("code", version.version).state == "unchecked"


async def test_startup_checks_configured_adapters_and_loads_pinned_ones(store: AdapterStore) -> None:
    engine = FakeEngine(logprobs=[math.inf] * PROBE_TOKENS)
    store.pin("code")
    await AdapterProbe(engine, store, Tokenizer()).startup(["code"])  # type: ignore[arg-type]
    assert store.health("code", store.version("code").version).state == "failed" and engine.loaded == ["code"]
