"""vLLM's worker LoRA manager finds an adapter in its host cache without copying the cache (no engine).

vLLM's own ``LRUCacheWorkerLoRAManager`` and ``LRUCacheLoRAModelManager`` classes, built without a model (only
the host cache and the active set that ``add_adapter`` and ``activate_adapter`` work on), with 500 adapters
cached: a request for a cached adapter must not call ``list_adapters`` (a copy of all 500), and must leave the
caches as vLLM's method does (its LRU entry touched, activated); any other request goes to vLLM's method.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from vllm.lora.model_manager import AdapterLRUCache, LRUCacheLoRAModelManager
from vllm.lora.request import LoRARequest
from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

from lora_ops import host_cache

CACHED, SLOTS = 500, 32


def _worker() -> Any:
    """vLLM's worker manager over a host cache of ``CACHED`` adapters (ids 1..CACHED, the oldest first), the
    last ``SLOTS`` of them active."""
    manager = object.__new__(LRUCacheLoRAModelManager)
    manager._registered_adapters = AdapterLRUCache(CACHED + 8, lambda lora_id: None)
    manager._active_adapters = AdapterLRUCache(SLOTS, lambda lora_id: None)
    manager.lora_config = SimpleNamespace(max_loras=SLOTS)  # lora_slots
    for lora_id in range(1, CACHED + 1):
        manager._registered_adapters.put(lora_id, object())
    for lora_id in range(CACHED - SLOTS + 1, CACHED + 1):
        manager._active_adapters.put(lora_id, None)
    worker = object.__new__(LRUCacheWorkerLoRAManager)
    worker._adapter_manager = manager
    return worker


class Counted:
    """Counts the calls of a method and runs it."""

    def __init__(self, method: Any) -> None:
        self.method, self.calls = method, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.method(*args, **kwargs)


def test_a_cached_adapter_is_found_without_copying_the_host_cache(monkeypatch):
    host_cache.install()
    listed = Counted(LRUCacheWorkerLoRAManager.list_adapters)
    monkeypatch.setattr(LRUCacheWorkerLoRAManager, "list_adapters", lambda self: listed(self))
    worker = _worker()
    manager = worker._adapter_manager
    active = CACHED  # in a slot already, as most of a decode step's requests are
    assert worker.add_adapter(LoRARequest("active", active, "/unused")) is True
    assert listed.calls == 0
    assert list(manager._registered_adapters.order)[-1] == active  # touched: now the most recent
    assert list(manager._active_adapters.order)[-1] == active


def test_any_other_request_takes_vllms_own_method(monkeypatch):
    """Not cached (vLLM loads it from disk: here a loader that refuses) or ``load_inplace``: vLLM's method."""
    host_cache.install()
    worker = _worker()

    class Refused(Exception):
        pass

    def refuse(request: LoRARequest) -> None:
        raise Refused(request.lora_int_id)

    worker._load_adapter = refuse
    with pytest.raises(Refused):
        worker.add_adapter(LoRARequest("new", CACHED + 1, "/unused"))
    with pytest.raises(Refused):
        worker.add_adapter(LoRARequest("again", 1, "/unused", load_inplace=True))
    assert 1 in worker._adapter_manager._registered_adapters  # the refused reload evicted nothing
