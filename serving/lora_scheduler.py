"""Bounded adapter-fair admission for vLLM's scheduler: a request whose adapter has no slot ages, then gets one.

A batch holds at most ``max_loras`` distinct adapters. vLLM 0.32's V1
scheduler (``Scheduler.schedule``, vllm/v1/core/sched/scheduler.py) scans the
waiting queue first come, first served, but a request whose adapter would be
one more than ``max_loras`` is *skipped* and the scan goes on: younger
requests for the adapters already in the batch are admitted past it. While
those adapters keep receiving requests, one of theirs is always running, no
slot frees, and the skipped request waits until their traffic stops (measured
on stock vLLM: 93-94 younger requests of a flooding adapter finished before
each rare one).

Never letting a request overtake an older one for a slot (LoRAX's rule for
its per-adapter queues) ends that, but it drains the slot holders' batches
whenever any adapter waits, which on the dev config cost 0.83x vLLM's
throughput. So this rule ages instead:

1. *Overtakes are counted.* After each step, every waiting request whose
   adapter holds no slot while all slots are taken (a *blocked* request)
   counts the younger adapter requests the step admitted past it.
2. *Only a request overtaken ``max_overtakes`` times is due.* Before a step
   with a due request, one slot holder is chosen to *drain*: the one whose
   running requests have the fewest tokens left to generate (it frees its slot
   soonest, and costs the batch least). Its waiting requests behind the
   oldest due request sit out of the step's scan; the other slot holders are
   topped up as usual, and no running request is ever preempted for it.
3. The drained adapter's slot frees when its running requests finish; vLLM's
   own scan then admits the oldest due request (nothing older is held).

Bound: a waiting request is overtaken at most ``max_overtakes`` times (plus
the admissions of the one step that makes it due) before it is due; once due,
it gets a slot within the drain of one slot holder (at most the largest
``max_tokens`` left among that adapter's running requests, in decode steps)
per older due request of another adapter. Requests without an adapter never
take a slot and are never held. With a slot free or no adapter blocked,
``schedule`` is vLLM's own, untouched: the rule adds only a look at the
step's newly admitted requests. With ``max_loras`` sized for a full batch
(``engine.max_loras`` left out, ``serving.sizing``) nothing is ever blocked.

Held requests keep their place: they leave the waiting queue for the one
``schedule()`` call and go back in their order afterwards, so vLLM's own
bookkeeping (skips, preemptions, stats) is untouched. ``serving.engine``
names the class in ``scheduler_cls`` and passes ``max_overtakes`` in vLLM's
``additional_config`` (:data:`MAX_OVERTAKES_KEY`); vLLM imports this module into
its engine-core process, so it imports nothing of ours.

How often the rule acts is counted in the engine core (:meth:`_AgingLoraAdmission.fairness_counts`):
requests that became due, drains started, and requests held out of a step. vLLM
answers a utility call ``call_utility_async(name)`` by calling the engine core's
attribute ``name`` between two steps; the scheduler is its ``scheduler``
attribute, so the scheduler answers :data:`FAIRNESS_UTILITY` as a callable
(``__call__``). ``serving.engine`` asks it while requests run, for the metrics.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

MAX_OVERTAKES_KEY = "loraserve_lora_max_overtakes"
"""The key in vLLM's ``additional_config`` that carries ``engine.lora_max_overtakes`` into the engine core."""

FAIRNESS_UTILITY = "scheduler"
"""The engine core's attribute that a utility call reaches the scheduler by (its ``__call__``: the counts)."""

_WAITING = (RequestStatus.WAITING, RequestStatus.PREEMPTED)


class _LoraRef(Protocol):
    @property
    def lora_int_id(self) -> int: ...


class _Queued(Protocol):
    @property
    def request_id(self) -> str: ...
    @property
    def lora_request(self) -> _LoraRef | None: ...
    @property
    def arrival_time(self) -> float: ...


def _adapter(request: Any) -> int | None:
    """The request's LoRA id; None for the base model (vLLM treats an id of 0 as no adapter too)."""
    lora = request.lora_request
    return lora.lora_int_id if lora is not None and lora.lora_int_id > 0 else None


def slot_holders(running: Iterable[Any]) -> set[int]:
    """The adapters in the batch: each holds one of the ``max_loras`` slots."""
    return {lora for request in running if (lora := _adapter(request)) is not None}


def count_overtakes(
    overtaken: Mapping[str, int], waiting: Iterable[_Queued], holders: set[int], admitted: Iterable[_Queued]
) -> dict[str, int]:
    """The overtake counts after a step that filled every slot (``holders``).

    ``overtaken``: the counts before the step; ``waiting``: the queue after it;
    ``admitted``: the requests the step admitted. Each waiting request whose
    adapter holds no slot gains one per admitted adapter request younger than
    itself; every other request drops out (it is no longer blocked).
    """
    arrivals = sorted(r.arrival_time for r in admitted if _adapter(r) is not None)
    counts: dict[str, int] = {}
    for request in waiting:
        lora = _adapter(request)
        if lora is None or lora in holders:
            continue
        passed = len(arrivals) - bisect.bisect_right(arrivals, request.arrival_time)
        if total := overtaken.get(request.request_id, 0) + passed:
            counts[request.request_id] = total
    return counts


def drain_choice(running: Iterable[Any], current: int | None) -> int:
    """The slot holder to drain: ``current`` while it still holds a slot, else the one that frees soonest.

    Soonest: the smallest largest number of tokens left among its running
    requests (ties: the lowest LoRA id, so the choice is deterministic).
    """
    left: dict[int, int] = {}
    for request in running:
        if (lora := _adapter(request)) is not None:
            left[lora] = max(left.get(lora, 0), request.max_tokens - request.num_output_tokens)
    if current in left:
        return current
    return min(left, key=lambda lora: (left[lora], lora))


def held_back(waiting: Iterable[_Queued], oldest_due: _Queued, drained: int) -> list[_Queued]:
    """The waiting requests of the ``drained`` adapter younger than ``oldest_due``: they sit out this step."""
    return [r for r in waiting if _adapter(r) == drained and r.arrival_time > oldest_due.arrival_time]


class _AgingLoraAdmission:
    """Mixed in before vLLM's scheduler class: wraps ``schedule()`` with the aging rule (module docstring)."""

    lora_config: Any
    waiting: Any  # vLLM's RequestQueue
    running: list[Any]
    requests: dict[str, Any]

    def __init__(self, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(vllm_config, *args, **kwargs)  # type: ignore[call-arg]
        self.max_overtakes: int = vllm_config.additional_config[MAX_OVERTAKES_KEY]
        self.overtaken: dict[str, int] = {}  # request id -> younger adapter requests admitted past it while blocked
        self.drained: int | None = None  # the slot holder whose younger waiting requests sit out
        self.counted_drain: int | None = None  # the drain last counted; None once nothing is due
        self.counts = {"due": 0, "drains": 0, "held": 0}  # see fairness_counts

    def __call__(self) -> dict[str, int]:
        """The answer to ``call_utility_async(FAIRNESS_UTILITY)``: :meth:`fairness_counts`."""
        return self.fairness_counts()

    def fairness_counts(self) -> dict[str, int]:
        """How often the rule acted since the engine started, for the metrics.

        ``due``: times a blocked request reached ``max_overtakes`` (it counts
        again if it got a slot's adapter, lost it and was overtaken anew);
        ``drains``: slot holders chosen to drain (one per due period and
        holder); ``held``: waiting requests held out of a step's scan, summed
        over steps (the rule's cost: each could have been admitted that step).
        """
        return dict(self.counts)

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        if self.lora_config is None:
            return super().schedule(throttle_prefills)  # type: ignore[misc]
        held = self._held()
        if held:
            output = self._schedule_without(held, throttle_prefills)
        else:
            self.drained = None
            output = super().schedule(throttle_prefills)  # type: ignore[misc]
        admitted = [self.requests[new.req_id] for new in output.scheduled_new_reqs if new.lora_request is not None]
        if admitted:
            holders = slot_holders(self.running)
            if len(holders) >= self.lora_config.max_loras:
                before, self.overtaken = (
                    self.overtaken,
                    count_overtakes(self.overtaken, self.waiting, holders, admitted),
                )
                self.counts["due"] += sum(
                    count >= self.max_overtakes and before.get(request_id, -1) < self.max_overtakes
                    for request_id, count in self.overtaken.items()
                )
        return output

    def _held(self) -> list[Any]:
        """This step's held requests: empty unless a blocked request is due and every slot is taken."""
        due = self._due()
        if not due:
            self.counted_drain = None  # a drain chosen later is a new one
            return []
        self.drained = drain_choice(self.running, self.drained)
        if self.drained != self.counted_drain:
            self.counted_drain = self.drained
            self.counts["drains"] += 1
        held = held_back(self.waiting, min(due, key=lambda r: r.arrival_time), self.drained)
        self.counts["held"] += len(held)
        return held

    def _due(self) -> list[Any]:
        """The due requests still blocked, while every slot is taken; forgets requests no longer waiting."""
        if not self.overtaken:
            return []
        waiting = {
            request_id: request
            for request_id in self.overtaken
            if (request := self.requests.get(request_id)) is not None and request.status in _WAITING
        }
        self.overtaken = {request_id: self.overtaken[request_id] for request_id in waiting}  # admitted, aborted: gone
        due = [request for request_id, request in waiting.items() if self.overtaken[request_id] >= self.max_overtakes]
        if not due:
            return []
        holders = slot_holders(self.running)
        if len(holders) < self.lora_config.max_loras:
            return []
        return [request for request in due if _adapter(request) not in holders]

    def _schedule_without(self, held: list[Any], throttle_prefills: bool) -> SchedulerOutput:
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


class FairLoraScheduler(_AgingLoraAdmission, Scheduler):
    """vLLM's scheduler with bounded adapter-fair admission (synchronous scheduling: vLLM's CPU platform)."""


class FairLoraAsyncScheduler(_AgingLoraAdmission, AsyncScheduler):
    """vLLM's async scheduler (GPU default) with bounded adapter-fair admission."""
