"""The engine wrapper: each version is built in the worker's background thread, then loaded once through
``add_lora`` before requests reach it, and ``max_cpu_loras`` sizes vLLM's host adapter cache from
``store.memory_budget_bytes``.

The engine here is a stand-in with vLLM's ``add_lora`` contract (an awaitable
that raises when the adapter is refused) and the worker extension's prefetch
RPCs (``collective_rpc``); the worker side runs for real in
tests/serving/test_lora_residency.py, and the real engine path, a refused
adapter that leaves the server serving, in tests/e2e/test_security_tenants.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from adapter_store import ServedAdapter
from serving.config import ConfigError, load_settings
from serving.engine import AdapterLoadFailed, LoraEngine
from serving.lora_residency import PREFETCH_DONE_METHOD, PREFETCH_METHOD
from serving.sizing import Hardware, resolve_sizing
from tests.serving.test_sizing import ADAPTER, SLOT_COST, fixed
from tests.serving.test_store import write_config


class _Engine:
    """What LoraEngine uses of vLLM's AsyncLLM for loading: the prefetch RPCs, add_lora (refusing ``bad``), errored.

    A background load takes ``polls`` asks of ``loraserve_prefetch_done``; ``log`` records every call in order.
    """

    def __init__(self, polls: int = 2) -> None:
        self.calls: list[str] = []
        self.log: list[tuple[str, object]] = []
        self.errored = False
        self.polls = polls
        self._asked: dict[int, int] = {}

    async def collective_rpc(self, method: str, args: tuple = ()) -> list:
        self.log.append((method, args))
        if method == PREFETCH_METHOD:
            self._asked[args[1]] = 0
            return [None]
        assert method == PREFETCH_DONE_METHOD
        self._asked[args[0]] += 1
        return [self._asked[args[0]] >= self.polls]

    async def add_lora(self, request) -> bool:
        self.calls.append(request.lora_name)
        self.log.append(("add_lora", request.lora_int_id))
        await asyncio.sleep(0.05)
        if request.lora_name == "bad":
            raise Exception("Call to add_lora method failed: Adapter bias is not supported.")
        return True


def _engine(tmp_path: Path) -> tuple[LoraEngine, _Engine]:
    engine = LoraEngine(load_settings(write_config(tmp_path, None, [])))
    fake = _Engine()
    engine._llm = fake
    return engine, fake


def _adapter(name: str) -> ServedAdapter:
    return ServedAdapter(name=name, version=name * 8, path=Path("/nonexistent") / name)


def test_concurrent_first_requests_share_one_load_and_later_ones_none(tmp_path: Path) -> None:
    engine, fake = _engine(tmp_path)

    async def run() -> None:
        await asyncio.gather(*(engine.ensure_loaded(_adapter("good")) for _ in range(10)))
        await engine.ensure_loaded(_adapter("good"))

    asyncio.run(run())
    assert fake.calls == ["good"] and engine._loading == {}


def test_add_lora_comes_after_the_background_load_finished(tmp_path: Path) -> None:
    engine, fake = _engine(tmp_path)
    fake.polls = 3
    adapter = _adapter("good")
    asyncio.run(engine.ensure_loaded(adapter))
    lora_id = engine.lora_request(adapter).lora_int_id
    assert fake.log == [
        (PREFETCH_METHOD, ("good", lora_id, str(adapter.path))),
        *[(PREFETCH_DONE_METHOD, (lora_id,))] * 3,
        ("add_lora", lora_id),
    ]


def test_a_refused_load_fails_every_waiting_caller_and_is_tried_again_later(tmp_path: Path) -> None:
    engine, fake = _engine(tmp_path)

    async def run() -> list[BaseException | None]:
        return await asyncio.gather(*(engine.ensure_loaded(_adapter("bad")) for _ in range(3)), return_exceptions=True)

    results = asyncio.run(run())
    assert all(isinstance(r, AdapterLoadFailed) and "bias is not supported" in str(r) for r in results)
    assert fake.calls == ["bad"] and engine._loading == {}  # nothing kept for a failed load
    with pytest.raises(AdapterLoadFailed):
        asyncio.run(engine.ensure_loaded(_adapter("bad")))
    assert fake.calls == ["bad", "bad"]


# The tiny base's largest valid adapter at rank 16 in bfloat16 in the host cache: its data and what its tensors and it
# cost beside it (tests/serving/test_sizing.py, tests/adapter_store/test_store.py).
PER_ADAPTER = ADAPTER
# The budget pays for the CPU LoRA ops' part beyond the slots (fixed(slots)), then the slots: vLLM's buffers and the CPU
# LoRA ops' copies of each (tests/serving/test_sizing.py).
TWO_SLOTS = 2 * SLOT_COST


@pytest.mark.parametrize(
    ("engine", "budget", "expected"),
    [
        ({"max_loras": 2}, None, 2),  # vLLM's default: max_loras
        ({"max_loras": 2, "max_cpu_loras": 3}, None, 3),
        ({"max_loras": 2}, fixed(2) + TWO_SLOTS + 5 * PER_ADAPTER + 7, 5),
        ({"max_loras": 2, "max_cpu_loras": 4}, fixed(2) + TWO_SLOTS + 5 * PER_ADAPTER, 4),
        (
            {"max_loras": 2, "max_cpu_loras": 6},
            fixed(2) + TWO_SLOTS + 5 * PER_ADAPTER,
            "does not fit store.memory_budget_bytes",
        ),
        (
            {"max_loras": 4},
            3 * PER_ADAPTER,
            f"raise the budget to at least {fixed(4) + 4 * (SLOT_COST + PER_ADAPTER)} bytes",
        ),
    ],
)
def test_memory_budget_sizes_the_host_adapter_cache(tmp_path: Path, engine: dict, budget, expected) -> None:
    store = {"root": "store"} if budget is None else {"root": "store", "memory_budget_bytes": budget}
    path = write_config(tmp_path, store, [])
    raw = yaml.safe_load(path.read_text())
    raw["engine"] = engine
    raw["model"]["dtype"] = "bfloat16"
    path.write_text(yaml.safe_dump(raw))
    settings = load_settings(path)
    cpu = Hardware("cpu", frozenset())
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=expected):
            resolve_sizing(settings, cpu)
    else:
        assert resolve_sizing(settings, cpu).max_cpu_loras.value == expected
