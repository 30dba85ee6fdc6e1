"""Adapter-fair admission for vLLM's scheduler: a request for an adapter without a slot is not starved.

A batch holds at most ``max_loras`` distinct adapters. vLLM 0.32's V1
scheduler (``Scheduler.schedule``, vllm/v1/core/sched/scheduler.py) admits
waiting requests first come, first served, but a request whose adapter would
be one more than ``max_loras`` is *skipped* and the scan goes on: younger
requests for adapters already in the batch are admitted past it. While the
adapters holding the slots keep receiving requests (one popular adapter with
``max_loras: 1``, or as many popular adapters as slots), some request of
theirs is always running, no slot ever frees, and the skipped request waits
until their traffic stops: ``tests/e2e/test_adapter_loaded_metric.py``
measures exactly that on stock vLLM.

The fix is LoRAX's rule for its per-adapter queues, applied to vLLM's one
queue: no request overtakes an older one *for a slot*. At the start of each
step, if every slot is taken and some waiting request's adapter holds none
(the oldest such is the *blocked head*), the requests queued behind it for the
adapters that hold the slots are held out of this step's scan. The slot
holders' running requests then finish without being topped up, the first
adapter to drain frees its slot, and the blocked head is admitted. Its wait
is bounded by the shortest drain of a slot holder (at most one request's
length) per older blocked head, whatever the other adapters' traffic. Nothing
is held while a slot is free or no waiting adapter lacks a slot, so an engine
whose slots fit the batch (``engine.max_loras`` left out, ``serving.sizing``)
never holds anything. Requests without an adapter never take a slot and are
never held.

Held requests keep their place: they are taken out of the waiting queue for
the one ``schedule()`` call and put back in their order afterwards, so vLLM's
own bookkeeping (skips, preemptions, stats) is untouched. ``serving.engine``
names the class in ``scheduler_cls``; vLLM imports this module into its
engine-core process, so it imports nothing of ours.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler


class _LoraRef(Protocol):
    @property
    def lora_int_id(self) -> int: ...


class _Queued(Protocol):
    @property
    def lora_request(self) -> _LoraRef | None: ...


def _adapter(request: _Queued) -> int | None:
    """The request's LoRA id; None for the base model (vLLM treats an id of 0 as no adapter too)."""
    lora = request.lora_request
    return lora.lora_int_id if lora is not None and lora.lora_int_id > 0 else None


def held_back(waiting: Iterable[_Queued], running: Iterable[_Queued], max_loras: int) -> list[_Queued]:
    """The waiting requests to leave out of this step's scan so that none overtakes an older one for a slot.

    ``waiting`` in the order vLLM scans it, ``running`` the requests in the
    batch. Empty unless every slot is taken by the running requests' adapters
    and a waiting request's adapter has none; then every request behind that
    oldest blocked one whose adapter holds a slot.
    """
    slot_holders = {lora for request in running if (lora := _adapter(request)) is not None}
    if len(slot_holders) < max_loras:
        return []
    held: list[_Queued] = []
    blocked = False
    for request in waiting:
        lora = _adapter(request)
        if lora is None:
            continue
        if lora not in slot_holders:
            blocked = True
        elif blocked:
            held.append(request)
    return held


class _FairLoraAdmission:
    """Mixed in before vLLM's scheduler class: wraps ``schedule()`` with :func:`held_back`."""

    lora_config: Any
    waiting: Any  # vLLM's RequestQueue
    running: list[Any]

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        held = [] if self.lora_config is None else held_back(self.waiting, self.running, self.lora_config.max_loras)
        if not held:
            return super().schedule(throttle_prefills)  # type: ignore[misc]
        place = {request: i for i, request in enumerate(self.waiting)}
        self.waiting.remove_requests(held)
        try:
            return super().schedule(throttle_prefills)  # type: ignore[misc]
        finally:
            # vLLM only pops admitted requests and puts skipped or preempted ones back at the front; a request
            # it put there that was not queued before (preempted this step) stays at the front.
            remaining = list(self.waiting)
            self.waiting.remove_requests(remaining)
            for request in sorted(remaining + held, key=lambda r: place.get(r, -1)):
                self.waiting.add_request(request)


class FairLoraScheduler(_FairLoraAdmission, Scheduler):
    """vLLM's scheduler with adapter-fair admission (synchronous scheduling: vLLM's CPU platform)."""


class FairLoraAsyncScheduler(_FairLoraAdmission, AsyncScheduler):
    """vLLM's async scheduler (GPU default) with adapter-fair admission."""
