"""The CPU overlay's ``model.dtype: auto`` through the real server, against transformers + PEFT.

The Kubernetes CPU overlay leaves the dtype to the machine: ``auto`` is bfloat16 where the CPU computes it
natively (``avx512_bf16`` or ``amx_bf16``), else float32 (``serving/sizing.py``). Every other server test
runs the dev config's float32; here the demo base and its three adapters are served as the overlay serves
them, over HTTP, and each answer is checked against float32 transformers + PEFT on the same files by
``bitnet_reference.py``'s rule, with the tolerances of the dtype the server says it resolved (bf16's were
measured on this model and these prompts). In bf16 each adapter's answers must also fall outside the
tolerance of the base model's reference, so the check tells an adapter from none; and they must deviate
from the reference by more than float32 does, so bf16 really ran. On a CPU without native bf16 this module
checks ``auto``'s float32 the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import REPO, RunningServer, demo_config, retire_server, start_server
from tests.e2e.bitnet_reference import (
    BF16_LORA_LOGPROB_TOLERANCE,
    BF16_LORA_TIE_GAP,
    DEMO_PROMPTS,
    LOGPROB_TOLERANCE,
    TIE_GAP,
    check,
    compare,
    demo_reference,
    served_greedy,
)

OVERLAY = REPO / "deploy" / "k8s" / "overlays" / "cpu" / "config.yaml"
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
MAX_TOKENS = 16

pytestmark = pytest.mark.engine


def overlay_dtype() -> str:
    return yaml.safe_load(OVERLAY.read_text())["model"]["dtype"]


@pytest.fixture(scope="module")
def auto_server(demo_assets, tmp_path_factory) -> Iterator[RunningServer]:
    config = demo_config(demo_assets)
    config["model"]["dtype"] = overlay_dtype()
    running = start_server(config, tmp_path_factory.mktemp("served_dtype"))
    yield running
    retire_server(running)


@pytest.fixture(scope="module")
def served_dtype(auto_server) -> str:
    sizing = httpx.get(f"{auto_server.url}/v1/adapters", timeout=30).json()["cache"]["sizing"]["model.dtype"]
    assert sizing["source"] == "derived", sizing
    return sizing["value"]


@pytest.fixture(scope="module")
def references(demo_assets) -> dict[str | None, Any]:
    return {name: demo_reference(demo_assets, name) for name in (None, *demo_assets.adapters)}


def test_the_cpu_overlay_leaves_the_dtype_to_the_machine() -> None:
    assert overlay_dtype() == "auto"


def test_auto_is_bf16_exactly_where_the_cpu_computes_it_natively(served_dtype: str) -> None:
    flags = set(Path("/proc/cpuinfo").read_text().split())
    native = any(flag in flags for flag in NATIVE_BF16_FLAGS)
    assert served_dtype == ("bfloat16" if native else "float32")


@pytest.mark.parametrize("adapter", [None, "code", "legal", "medical"])
def test_the_overlays_dtype_answers_as_transformers_peft(
    auto_server, served_dtype: str, references, adapter: str | None
) -> None:
    bf16 = served_dtype == "bfloat16"
    tolerance, tie_gap = (BF16_LORA_LOGPROB_TOLERANCE, BF16_LORA_TIE_GAP) if bf16 else (LOGPROB_TOLERANCE, TIE_GAP)
    deviations, off_base = [], []
    for prompt in DEMO_PROMPTS:
        choice = served_greedy(auto_server.url, adapter or auto_server.base_model, prompt, MAX_TOKENS)
        ids, tokens, logprobs = choice["prompt_token_ids"], choice["token_ids"], choice["logprobs"]["token_logprobs"]
        assert len(tokens) == MAX_TOKENS
        result = compare(references[adapter], ids, tokens, logprobs, tie_gap=tie_gap)
        what = f"{served_dtype} {adapter or 'base'} {prompt!r}"
        print(f"{what}: deviation {result.deviation:.2e}, exact tokens required {result.must_match}")
        check(result, tokens, what, tolerance=tolerance, tie_gap=tie_gap)
        deviations.append(result.deviation)
        if adapter is not None:
            off_base.append(compare(references[None], ids, tokens, logprobs, tie_gap=tie_gap).deviation)
    if adapter is not None:  # the tolerance tells this adapter's answers from the base model's
        assert max(off_base) > tolerance, off_base
    if bf16:  # float32 agrees with the reference to ~1e-5 (test_reference.py); bf16 moves it by more
        assert max(deviations) > 1e-3, deviations
