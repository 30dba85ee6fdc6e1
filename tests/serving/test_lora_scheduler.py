"""Bounded adapter-fair admission (``serving.lora_scheduler``) on vLLM's real ``Scheduler``, driven step by step.

Each scenario builds vLLM's scheduler on a tiny config (a one-layer Llama config.json in a temporary directory,
no weights: the scheduler never runs the model) and plays closed-loop clients: a *flood* of adapter requests that
replaces every finished request with a new one, and a few *rare* requests of an adapter without a slot. Each step
feeds back one sampled token per scheduled decode, as the model runner would. Measured: how many younger adapter
requests were admitted before each rare one (its overtakes). The end-to-end check is the fairness test in
``tests/e2e/test_lora_info_metric.py``.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from vllm.config import CacheConfig, LoRAConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.lora.request import LoRARequest
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from serving.config import ConfigError, parse_settings
from serving.engine import engine_args
from serving.lora_scheduler import (
    MAX_OVERTAKES_KEY,
    FairLoraScheduler,
    count_overtakes,
    drain_choice,
    held_back,
)
from serving.sizing import Hardware, resolve_sizing

BLOCK = 16
MAX_SEQS = 8
BLOCKS = 512


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 1, "vocab_size": 128,
        "max_position_embeddings": 512, "torch_dtype": "float32",
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    return path


def scheduler(model_dir: Path, cls: type, max_loras: int, max_overtakes: int | None) -> Any:
    """vLLM's scheduler class ``cls`` on a tiny config; KV blocks aplenty, so no step preempts for memory."""
    vllm_config = VllmConfig(
        model_config=ModelConfig(model=str(model_dir), skip_tokenizer_init=True, dtype="float32", max_model_len=256),
        scheduler_config=SchedulerConfig(
            max_num_seqs=MAX_SEQS, max_num_batched_tokens=256, max_model_len=256, is_encoder_decoder=False
        ),
        cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=False),
        lora_config=LoRAConfig(max_loras=max_loras, max_lora_rank=8),
        additional_config={} if max_overtakes is None else {MAX_OVERTAKES_KEY: max_overtakes},
    )
    vllm_config.cache_config.num_gpu_blocks = BLOCKS
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=8, dtype=torch.float32)
    kv = KVCacheConfig(num_blocks=BLOCKS, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)])
    return cls(
        vllm_config=vllm_config,
        kv_cache_config=kv,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=BLOCK,
    )


@dataclass
class Workload:
    """Closed-loop clients: ``flood`` lists each client's (adapter, ``max_tokens``, first step; adapter 0: the base
    model); the ``rare`` adapters send ``rare_requests`` each at every step in ``rare_at``; the flood stops after
    ``flood_total`` requests. Flood clients of equal lengths started at staggered steps keep their stagger, so one
    of them is always running: the slot never frees by chance."""

    flood: list[tuple[int, int, int]]
    rare: list[int] = field(default_factory=list)
    rare_requests: int = 1
    rare_at: tuple[int, ...] = (12,)
    flood_total: int = 120


def staggered(adapter: int, clients: int, max_tokens: int = 12, first: int = 0, every: int = 3) -> list:
    return [(adapter, max_tokens, first + i * every) for i in range(clients)]


@dataclass
class Trace:
    admitted: list[list[str]] = field(default_factory=list)  # request ids admitted per step
    order: list[str] = field(default_factory=list)  # admission order
    preemptions: int = 0


def play(sched: Any, work: Workload, max_steps: int = 4000) -> tuple[Trace, dict[str, Request]]:
    """Run ``work`` to completion through ``sched``; every request generates exactly its ``max_tokens``."""
    clock = itertools.count()
    sent: dict[str, Request] = {}

    def send(name: str, adapter: int, max_tokens: int) -> None:
        lora = LoRARequest(f"a{adapter}", adapter, "/unused") if adapter else None
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        request = Request(name, [1, 2, 3, 4], params, None, arrival_time=next(clock), lora_request=lora)
        sent[name] = request
        sched.add_request(request)

    flood_sent = itertools.count()
    client_of: dict[str, tuple[int, int]] = {}

    def flood_once(adapter: int, max_tokens: int) -> None:
        if (n := next(flood_sent)) < work.flood_total:
            name = f"flood{adapter}-{n}"
            client_of[name] = (adapter, max_tokens)
            send(name, adapter, max_tokens)

    trace = Trace()
    for step in range(max_steps):
        for adapter, max_tokens, first in work.flood:
            if step == first:
                flood_once(adapter, max_tokens)
        if step in work.rare_at:
            for adapter, i in itertools.product(work.rare, range(work.rare_requests)):
                send(f"rare{adapter}-{step}-{i}", adapter, 8)
        if not sched.has_requests():
            break
        out = sched.schedule()
        trace.admitted.append([new.req_id for new in out.scheduled_new_reqs])
        trace.order += trace.admitted[-1]
        ids = list(out.num_scheduled_tokens)
        tokens = [[7] if sched.requests[i].num_computed_tokens >= sched.requests[i].num_tokens else [] for i in ids]
        runner = ModelRunnerOutput(req_ids=ids, req_id_to_index={i: n for n, i in enumerate(ids)})
        runner.sampled_token_ids = tokens
        sched.update_from_output(out, runner)
        for name in ids:
            if name not in sched.requests and name in client_of:  # finished: its client sends the next one
                flood_once(*client_of[name])
    else:
        raise AssertionError("the workload did not finish")
    trace.preemptions = sum(r.num_preemptions for r in sent.values())
    assert all(r.num_output_tokens == r.max_tokens for r in sent.values())
    return trace, sent


def overtakes(trace: Trace, sent: dict[str, Request]) -> dict[str, int]:
    """Per rare request: the younger adapter requests admitted before it."""
    place = {name: i for i, name in enumerate(trace.order)}
    return {
        name: sum(
            place[other] < place[name] and sent[other].arrival_time > request.arrival_time
            for other in trace.order
            if sent[other].lora_request is not None
        )
        for name, request in sent.items()
        if name.startswith("rare")
    }


STARVING = [
    # one slot, one adapter flooding it from 4 staggered clients
    pytest.param(Workload(staggered(1, 4), rare=[2]), 1, id="one-slot"),
    # two slots, both flooded; two rare adapters behind them
    pytest.param(Workload(staggered(1, 3) + staggered(2, 3, first=1), rare=[3, 4], rare_requests=2), 2, id="two-slots"),
    # the flood also sends base requests, which never take a slot
    pytest.param(Workload(staggered(1, 3) + staggered(0, 2, max_tokens=7, first=1), rare=[2]), 1, id="with-base"),
]
MAX_OVERTAKES = [0, 5, 20]


def bound(work: Workload, max_overtakes: int) -> int:
    """The most overtakes a rare request may see: ``max_overtakes``, plus the one step's admissions that make it
    due (at most one per flood client), plus one drain's worth per older due request of another adapter."""
    clients = len(work.flood)
    return max_overtakes + clients + (len(work.rare) - 1) * clients


@pytest.mark.parametrize(("work", "max_loras"), STARVING)
def test_stock_vllm_starves_a_rare_adapter_while_the_flood_lasts(model_dir: Path, work, max_loras) -> None:
    """The baseline the rule fixes: stock vLLM lets far more requests pass than the rule's largest bound here."""
    trace, sent = play(scheduler(model_dir, Scheduler, max_loras, None), work)
    assert min(overtakes(trace, sent).values()) > 1.5 * bound(work, max(MAX_OVERTAKES)), overtakes(trace, sent)


@pytest.mark.parametrize("max_overtakes", MAX_OVERTAKES)
@pytest.mark.parametrize(("work", "max_loras"), STARVING)
def test_a_rare_adapter_is_overtaken_a_bounded_number_of_times(model_dir: Path, work, max_loras, max_overtakes) -> None:
    trace, sent = play(scheduler(model_dir, FairLoraScheduler, max_loras, max_overtakes), work)
    assert max(overtakes(trace, sent).values()) <= bound(work, max_overtakes), overtakes(trace, sent)
    assert trace.preemptions == 0  # running requests are never preempted for it


@pytest.mark.parametrize(
    ("work", "max_loras", "max_overtakes"),
    [
        pytest.param(Workload(staggered(1, 4), rare=[2]), 2, 0, id="a-slot-is-free"),
        pytest.param(Workload(staggered(1, 2) + staggered(0, 2, first=1)), 1, 0, id="nothing-blocked"),
        pytest.param(Workload(staggered(1, 4), rare=[2]), 1, 10_000, id="never-due"),
    ],
)
def test_without_a_due_request_every_step_is_vllms_own(model_dir: Path, work, max_loras, max_overtakes) -> None:
    """No adapter blocked, or none overtaken enough: the same admissions, step by step, as stock vLLM."""
    stock, _ = play(scheduler(model_dir, Scheduler, max_loras, None), work)
    fair, _ = play(scheduler(model_dir, FairLoraScheduler, max_loras, max_overtakes), work)
    assert fair.admitted == stock.admitted


def test_only_the_holder_that_frees_soonest_is_drained(model_dir: Path) -> None:
    """Two slots: adapter 1's five clients run 12-token requests, adapter 2's two clients 5-token ones; the rare
    adapter 3 is due after its first overtake (max_overtakes 0). Adapter 2 drains (its requests end sooner);
    adapter 1 keeps being topped up meanwhile."""
    work = Workload(staggered(1, 5, every=2) + staggered(2, 2, max_tokens=5, first=1), rare=[3], flood_total=80)
    trace, sent = play(scheduler(model_dir, FairLoraScheduler, 2, 0), work)
    rare = next(step for step, names in enumerate(trace.admitted) if "rare3-12-0" in names)
    sent_at = sent["rare3-12-0"].arrival_time
    younger = [any(sent[name].arrival_time > sent_at for name in names) for names in trace.admitted]
    due = younger.index(True)  # its first overtake: held from the next step on
    during = [name for names in trace.admitted[due + 1 : rare] for name in names]
    assert any(name.startswith("flood1") for name in during), trace.admitted[due : rare + 1]
    assert not any(name.startswith("flood2") for name in during), trace.admitted[due : rare + 1]


def req(name: str, arrival: float, left: int = 0) -> SimpleNamespace:
    """A stand-in request for adapter ``name``'s first letter (its LoRA id); ``base`` for none."""
    lora = None if name.startswith("base") else SimpleNamespace(lora_int_id=ord(name[0]))
    return SimpleNamespace(
        request_id=name, lora_request=lora, arrival_time=arrival, max_tokens=left, num_output_tokens=0
    )


@pytest.mark.parametrize(
    ("before", "waiting", "admitted", "after"),
    [
        # c1 (blocked: a and b hold the slots) is passed by the younger a3 and b3, not by the older a1
        ({}, ["c1@2"], ["a1@1", "a3@3", "b3@4"], {"c1": 2}),
        # counts add up over steps; a request whose adapter now holds a slot drops out
        ({"c1": 4, "a2": 1}, ["c1@2", "a2@3"], ["b5@5"], {"c1": 5}),
        # base requests neither take a slot nor count as overtaking
        ({}, ["c1@2", "base@1"], ["base2@5"], {}),
    ],
)
def test_overtakes_are_younger_adapter_admissions_past_a_blocked_request(before, waiting, admitted, after) -> None:
    def parse(spec: str) -> SimpleNamespace:
        name, _, at = spec.partition("@")
        return req(name, float(at))

    holders = {ord("a"), ord("b")}
    got = count_overtakes(before, [parse(w) for w in waiting], holders, [parse(a) for a in admitted])
    assert got == after


@pytest.mark.parametrize(
    ("running", "current", "drained"),
    [
        ([("a1", 30), ("b1", 5), ("b2", 9)], None, "b"),  # b's longest request ends first
        ([("a1", 30), ("b1", 5)], "a", "a"),  # the choice sticks while its holder still holds a slot
        ([("a1", 30), ("b1", 5)], "c", "b"),  # c drained already: choose again
        ([("a1", 5), ("b1", 5), ("base", 1)], None, "a"),  # ties: the lower id; base holds no slot
    ],
)
def test_the_drained_holder_frees_its_slot_soonest(running, current, drained) -> None:
    requests = [req(name, 0, left) for name, left in running]
    assert drain_choice(requests, None if current is None else ord(current)) == ord(drained)


def test_held_requests_are_the_drained_adapters_younger_than_the_due_one() -> None:
    waiting = [req("a1", 1), req("c1", 2), req("b1", 3), req("a2", 4), req("base", 5)]
    assert [r.request_id for r in held_back(waiting, waiting[1], ord("a"))] == ["a2"]


def settings_with(**engine: Any) -> Any:
    raw = {"model": {"path": "/m", "name": "base"}, "auth": {"mode": "open"}, "engine": {"max_loras": 2, **engine}}
    return parse_settings(raw)


@pytest.mark.parametrize(
    ("engine", "scheduler_cls", "additional"),
    [
        ({}, "serving.lora_scheduler.FairLoraScheduler", {MAX_OVERTAKES_KEY: 64}),  # the default
        ({"lora_max_overtakes": 0}, "serving.lora_scheduler.FairLoraScheduler", {MAX_OVERTAKES_KEY: 0}),
        ({"lora_max_overtakes": None}, None, {}),  # vLLM's own scheduler
    ],
)
def test_the_engine_gets_the_fair_scheduler_unless_it_is_turned_off(engine, scheduler_cls, additional) -> None:
    settings = settings_with(**engine)
    args = engine_args(settings, resolve_sizing(settings, Hardware("cpu", frozenset())))
    assert (args.scheduler_cls, args.additional_config) == (scheduler_cls, additional)
    assert args.async_scheduling is (None if scheduler_cls is None else False)  # the CPU's synchronous scheduler


def test_a_negative_overtake_limit_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="engine.lora_max_overtakes"):
        settings_with(lora_max_overtakes=-1)


@pytest.mark.parametrize(
    ("work", "max_loras", "max_overtakes", "due", "drains"),
    [
        # one rare request, due after its first overtake: one due request, one holder drained for it
        pytest.param(Workload(staggered(1, 4), rare=[2]), 1, 0, 1, 1, id="one-slot"),
        # two rare adapters behind two flooded slots: each due once (its second request rides its first's slot)
        pytest.param(Workload(staggered(1, 3) + staggered(2, 3, first=1), rare=[3, 4]), 2, 0, 2, 2, id="two-slots"),
        # two waves of the rare adapter, apart: the same holder drained once per wave (flood requests of unequal
        # lengths, so the flood, lined up by the first drain, is staggered again when the second wave comes)
        pytest.param(
            Workload([(1, 10, 0), (1, 13, 3), (1, 17, 6), (1, 11, 9)], rare=[2], rare_at=(12, 80), flood_total=200),
            1,
            0,
            2,
            2,
            id="two-waves",
        ),  # fmt: skip
        pytest.param(Workload(staggered(1, 4), rare=[2]), 1, 10_000, 0, 0, id="never-due"),
        pytest.param(Workload(staggered(1, 4), rare=[2]), 2, 0, 0, 0, id="a-slot-is-free"),
    ],
)
def test_the_scheduler_counts_due_requests_drains_and_held_requests(
    model_dir: Path, work, max_loras, max_overtakes, due, drains
) -> None:
    """The counts the metrics export, answered the way vLLM's utility call reaches them (calling the scheduler):
    each due request counted once however many steps it stays due, one drain per holder chosen for it (not one per
    step), and held requests exactly when a drain held some back."""
    sched = scheduler(model_dir, FairLoraScheduler, max_loras, max_overtakes)
    play(sched, work)
    counts = sched()
    assert (counts["due"], counts["drains"]) == (due, drains), counts
    assert (counts["held"] > 0) == (due > 0), counts
    assert counts == sched.fairness_counts()
