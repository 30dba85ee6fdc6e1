"""Adapter-fair admission (``serving.lora_scheduler``): which waiting requests sit out a step, and that they keep
their place in vLLM's own queue. The end-to-end check is ``tests/e2e/test_adapter_loaded_metric.py``."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from vllm.v1.core.sched.request_queue import FCFSRequestQueue

from serving.lora_scheduler import _FairLoraAdmission, held_back


@dataclass(frozen=True)
class Lora:
    lora_int_id: int


@dataclass(eq=False)  # hashed by identity, like vLLM's requests
class Req:
    name: str
    lora_request: Lora | None


def req(name: str) -> Req:
    """A request for adapter ``name``'s first letter (its LoRA id); ``base`` for none."""
    return Req(name, None if name.startswith("base") else Lora(ord(name[0])))


def names(requests) -> list[str]:
    return [r.name for r in requests]


@pytest.mark.parametrize(
    ("running", "waiting", "max_loras", "held"),
    [
        # one slot, flooded by a: the younger a's behind the blocked b sit out; older a's and base do not
        (["a1"], ["a2", "b1", "a3", "base1", "a4"], 1, ["a3", "a4"]),
        # a slot is free: vLLM admits b itself, nothing is held
        (["a1"], ["b1", "a2"], 2, []),
        # both slots held (a, b): c is blocked, the a's and b's behind it sit out, whichever drains first frees c's
        (["a1", "b1"], ["a2", "c1", "b2", "a3", "c2"], 2, ["b2", "a3"]),
        # every waiting adapter holds a slot: nothing is blocked
        (["a1", "b1"], ["a2", "b2"], 2, []),
        # base requests never take a slot, so a batch of base requests holds none
        (["base1"], ["b1", "base2"], 1, []),
        # the blocked head may be a later request; only those behind it sit out
        (["a1"], ["a2", "a3", "c1", "a4"], 1, ["a4"]),
        # id 0 is no adapter for vLLM either
        ([], [], 1, []),
    ],
)
def test_younger_requests_of_slot_holders_sit_out_behind_a_blocked_adapter(running, waiting, max_loras, held):
    assert names(held_back([req(n) for n in waiting], [req(n) for n in running], max_loras)) == held


class RecordingScheduler:
    """Stands in for vLLM's scheduler: admits the queue's first request, as far as this test needs."""

    def __init__(self, running: list[str], waiting: list[str]) -> None:
        self.lora_config = SimpleNamespace(max_loras=1)
        self.running: list[Any] = [req(n) for n in running]
        queue: Any = FCFSRequestQueue()  # vLLM's own queue, holding stand-in requests
        for n in waiting:
            queue.add_request(req(n))
        self.waiting = queue
        self.seen: list[str] = []

    def schedule(self, throttle_prefills: bool = False):
        self.seen = names(self.waiting)
        self.running.append(self.waiting.pop_request())
        return "output"


class Fair(_FairLoraAdmission, RecordingScheduler):
    pass


def test_held_requests_sit_out_one_step_and_keep_their_place() -> None:
    scheduler = Fair(["a1"], ["a2", "b1", "a3", "base1", "a4"])
    assert scheduler.schedule() == "output"
    assert scheduler.seen == ["a2", "b1", "base1"]  # what vLLM's scan saw this step
    assert names(scheduler.waiting) == ["b1", "a3", "base1", "a4"]  # a2 admitted, the rest in their order


def test_nothing_changes_without_lora() -> None:
    scheduler = Fair(["a1"], ["a2", "b1", "a3"])
    scheduler.lora_config = None
    scheduler.schedule()
    assert scheduler.seen == ["a2", "b1", "a3"]
