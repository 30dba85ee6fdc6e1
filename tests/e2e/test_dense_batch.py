"""Sixteen distinct adapters in one engine step, through the real server, each answering as it does alone
and as transformers + PEFT does with that adapter's files.

The config leaves ``engine.max_loras`` and ``engine.max_cpu_loras`` out, so
the server sizes the slots for a full batch (``engine.max_num_seqs`` = 16,
``serving/sizing.py``); with the old fixed 4 slots vLLM's scheduler could
never run more than four distinct adapters at once. The test asks every
adapter alone (its reference answer), then all sixteen at once (again, up to
``TRIES`` times, where the engine finished the first before the last arrived),
and proves from vLLM's own metrics that they ran together: ``vllm:lora_requests_info``
keeps one series per set of adapters that were running at one engine step
(``running_lora_adapters``), and with every running request scheduled in
every step (16 sequences, far under the token budget), a set of sixteen
names is sixteen adapters in one step. float32 (the dev config), so an
answer depends on its batch neighbours only through summation order.

The one compiled engine of the test suite (every other test engine runs
``enforce_eager``): vLLM's CPU compilation, which ``lora_ops`` keeps on with
LoRA enabled, traces the model once in a step without adapters; the LoRA
layers are opaque ops in that graph that follow each later step's adapters.
The server's log shows the engine compiled with them.

Each answer of the dense step is then checked against the reference
(``bitnet_reference.py``'s rule, as in ``test_reference.py``: transformers'
BitNet + PEFT on the same adapter files, in this process) and must sit
closer to its own adapter's reference than to any of the other fifteen: a
slot holding another adapter's weights, or a request run with its
neighbour's slot, fails here even where two adapters' greedy tokens agree
(three demo domains at sixteen scales: some do).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import torch

from tests.conftest import RunningServer, demo_config, retire_server, start_server
from tests.e2e.adapter_files import copy_adapter
from tests.e2e.bitnet_reference import MIN_EXACT_TOKENS, check, compare

ADAPTERS = 16
PROMPT = "Please explain how it works"
TOKENS = MIN_EXACT_TOKENS  # the reference rule compares up to this many greedy tokens
# Same text, log-probabilities within 5e-3: sixteen batch neighbours moved one by 1.05e-3 in float32 in one run
# (cause not investigated; eight neighbours stay within 1e-3 in test_adapter_cache); two of these adapters differ
# by more than DISTINCT.
LOGPROB_TOLERANCE, DISTINCT = 5e-3, 2e-2
LORA_INFO = "vllm:lora_requests_info{"
# The sixteen are sent at once, but the engine may run the first ones before the last arrive (a loaded machine
# delays the API process): each try is checked in vLLM's metrics, and the answers compared are those of the try
# in which all sixteen ran in one step.
TRIES = 3
COMPILED = "'mode': <CompilationMode.DYNAMO_TRACE_ONCE: 2>"  # in vLLM's engine config line

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def dense(demo_assets, tmp_path_factory) -> Iterator[RunningServer]:
    workdir = tmp_path_factory.mktemp("dense-batch")
    config = demo_config(demo_assets, max_num_seqs=ADAPTERS, enforce_eager=False)
    for key in ("max_loras", "max_cpu_loras"):  # derived by the server
        del config["engine"][key]
    assert config["model"]["dtype"] == "float32"
    config["adapters"] = []
    for i in range(ADAPTERS):
        domain = ("code", "legal", "medical")[i % 3]
        path = copy_adapter(demo_assets.adapters[domain], workdir / f"dense-{i:02d}", scale=0.5 + 0.1 * i)
        config["adapters"].append({"name": f"dense-{i:02d}", "path": str(path)})
    config["routing"] = None  # not under test
    running = start_server(config, workdir)
    yield running
    retire_server(running)


@pytest.fixture(scope="module")
def reference(dense: RunningServer, demo_assets) -> Any:
    """transformers + PEFT with all sixteen adapters loaded from the files the server serves, one active at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapters = {a["name"]: a["path"] for a in dense.config["adapters"]}
    with torch._dynamo.config.patch(disable=True):  # unpacking at load is a compiled function
        base = AutoModelForCausalLM.from_pretrained(demo_assets.base, dtype=torch.float32)
        model: Any = None
        for name, path in adapters.items():
            if model is None:
                model = PeftModel.from_pretrained(base, path, adapter_name=name)
            else:
                model.load_adapter(path, adapter_name=name)
    return model.eval()


@dataclass
class Answer:
    text: str
    logprobs: list[float]
    prompt_ids: list[int]
    tokens: list[int]


async def _complete(client: httpx.AsyncClient, model: str) -> Answer:
    body = {"model": model, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True,
            "logprobs": 0, "return_token_ids": True}  # fmt: skip
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return Answer(choice["text"], choice["logprobs"]["token_logprobs"], choice["prompt_token_ids"], choice["token_ids"])


def _same(a: Answer, b: Answer, tolerance: float = LOGPROB_TOLERANCE) -> bool:
    return a.text == b.text and max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) <= tolerance


@contextmanager
def _one_thread() -> Iterator[None]:
    """The reference's ops are tiny: on a busy machine OpenMP's thread sync costs more than their arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _deviations(model: Any, answers: list[Answer]) -> list[float]:
    """Per answer: max |served - reference| log-probability of its tokens, teacher-forced through ``model``
    (one batch: every answer has the same prompt and length)."""
    ids = torch.tensor([a.prompt_ids + a.tokens for a in answers])
    start = len(answers[0].prompt_ids) - 1
    with torch.no_grad(), torch._dynamo.config.patch(disable=True):
        teacher = torch.log_softmax(model(ids).logits[:, start:-1].float(), dim=-1)
    chosen = teacher.gather(2, ids[:, start + 1 :, None])[..., 0]
    return (torch.tensor([a.logprobs for a in answers]) - chosen).abs().amax(dim=1).tolist()


def _running_sets(metrics: str) -> list[set[str]]:
    """Every set of adapters vLLM reported running together (one ``vllm:lora_requests_info`` series each)."""
    sets = []
    for line in metrics.splitlines():
        if line.startswith(LORA_INFO):
            running = line.split('running_lora_adapters="', 1)[1].split('"', 1)[0]
            sets.append({name for name in running.split(",") if name})
    return sets


def test_the_server_sizes_the_slots_for_a_full_batch(dense: RunningServer) -> None:
    cache = httpx.get(f"{dense.url}/v1/adapters").json()["cache"]
    assert cache["max_loras"] == cache["max_cpu_loras"] == ADAPTERS
    slots = cache["sizing"]["engine.max_loras"]
    assert (slots["value"], slots["source"]) == (ADAPTERS, "derived")
    assert f"engine.max_num_seqs {ADAPTERS}" in slots["reason"]
    assert cache["sizing"]["model.dtype"] == {"value": "float32", "source": "configured", "reason": "model.dtype"}
    metrics = httpx.get(f"{dense.url}/metrics").text
    assert f'loraserve_engine_size{{setting="max_loras",source="derived"}} {ADAPTERS}.0' in metrics
    assert 'loraserve_engine_dtype{dtype="float32",source="configured"} 1.0' in metrics
    assert f'max_lora="{ADAPTERS}"' in metrics  # vLLM's own report: the engine got the derived slots


def test_the_engine_compiled_its_model_with_the_lora_ops_in_the_graph(dense: RunningServer) -> None:
    log = dense.log()
    assert COMPILED in log, "vLLM did not compile the LoRA engine's model"
    assert "LoRA ops traced into a compiled graph as loraserve::" in log, "the LoRA layers were not traced as our op"


def test_sixteen_adapters_in_one_step_each_answer_as_alone_and_as_the_reference(
    dense: RunningServer, reference: Any
) -> None:
    names = [f"dense-{i:02d}" for i in range(ADAPTERS)]

    async def run() -> tuple[dict[str, Answer], list[Answer], list[set[str]]]:
        async with httpx.AsyncClient(base_url=dense.url, timeout=300) as client:
            alone = {name: await _complete(client, name) for name in names}  # one at a time: no set of sixteen
            for attempt in range(1, TRIES + 1):
                await asyncio.gather(*(client.get("/health") for _ in names))  # sixteen connections open
                together = await asyncio.gather(*(_complete(client, name) for name in names))
                sets = _running_sets((await client.get("/metrics")).text)
                if set(names) in sets:  # first seen after this try: these answers are the dense step's
                    print(f"the sixteen ran in one step in try {attempt} of {TRIES}")
                    break
            return alone, together, sets

    alone, together, sets = asyncio.run(run())
    widest = max(sets, key=len)
    assert widest == set(names), f"in {TRIES} tries at most {len(widest)} adapters ran together: {sorted(widest)}"
    # Sixteen adapters, sixteen different answers: a batch that mixed them up could not match below.
    for a in names:
        assert not any(_same(alone[a], alone[b], DISTINCT) for b in names if b != a), a
    for name, got in zip(names, together, strict=True):
        assert _same(got, alone[name]), (name, got, alone[name])
    with _one_thread():
        # The dense step's answers against transformers + PEFT on each adapter's own files.
        for name, got in zip(names, together, strict=True):
            reference.set_adapter(name)
            comparison = compare(reference, got.prompt_ids, got.tokens, got.logprobs)
            check(comparison, got.tokens, f"{name} in the dense step")
        # ... and each is its own adapter's, not a neighbour's: nearest of the sixteen references.
        deviations = {}  # reference adapter -> deviation of each answer
        for other in names:
            reference.set_adapter(other)
            deviations[other] = _deviations(reference, together)
    for k, name in enumerate(names):
        row = {other: deviations[other][k] for other in names}
        nearest = min(row, key=row.__getitem__)
        rest = min(v for other, v in row.items() if other != name)
        print(f"{name}: own reference {row[name]:.2e}, nearest other {rest:.2e}")
        assert nearest == name, f"{name}'s answer is nearest {nearest}'s reference: {row}"
