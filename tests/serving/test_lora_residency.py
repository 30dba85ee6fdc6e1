"""The worker extension's loads off the engine step (``serving.lora_residency``), with vLLM's own ``_load_adapter``.

vLLM's ``WorkerLoRAManager._load_adapter`` runs for real on the demo adapters
(reading the safetensors, vLLM's PEFT checks, building the ``LoRAModel``); only
the model-manager attributes it reads are given here, as a tiny Llama's LoRA
manager has them. The engine path (``collective_rpc`` into the worker, the
``add_lora`` after it) is in tests/e2e/test_adapter_cache.py.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from serving.lora_residency import LOADER_NICE, LoraResidencyExtension
from tests.bitnet.conftest import vllm_world  # noqa: F401  (a fixture: the 1-rank world vLLM's layers need)

pytest.importorskip("vllm")
from vllm.config.lora import LoRAConfig
from vllm.lora.lora_model import LoRAModel
from vllm.lora.request import LoRARequest
from vllm.lora.worker_manager import WorkerLoRAManager

TIMEOUT_S = 30.0


class _Manager(WorkerLoRAManager):
    """vLLM's worker LoRA manager with the attributes ``_load_adapter`` reads, no model behind it.

    ``gate`` holds every load until the test opens it; ``threads`` records which thread each load ran on.
    """

    def __init__(self) -> None:  # vLLM's __init__ wants a whole VllmConfig; _load_adapter reads these only
        self._lora_model_cls = LoRAModel
        self.lora_config = LoRAConfig(max_lora_rank=16, max_loras=2, lora_dtype=torch.float32)
        self.max_position_embeddings = 2048
        self.vocab_size = 2048
        self._adapter_manager = SimpleNamespace(
            supported_lora_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
            punica_wrapper_mapping={},  # vLLM's stock wrapper: no forms of ours to build (lora_ops.ready)
            packed_modules_mapping={
                "qkv_proj": ["q_proj", "k_proj", "v_proj"],
                "gate_up_proj": ["gate_proj", "up_proj"],
            },
            model=SimpleNamespace(),
            list_adapters=lambda: self.cached,
            moe_ep_load_spec=None,
            _validate_moe_lora_format=lambda lora: None,
            _validate_modules_to_save=lambda lora: None,
            _validate_token_classification_lora=lambda lora: None,
        )
        self.gate = threading.Event()
        self.threads: list[int] = []
        self.cached: set[int] = set()  # the ids in the host cache

    def _load_adapter(self, lora_request: LoRARequest) -> LoRAModel:
        self.threads.append(threading.get_ident())
        assert self.gate.wait(TIMEOUT_S)
        return super()._load_adapter(lora_request)


class _Worker(LoraResidencyExtension):
    def __init__(self) -> None:
        self.model_runner = SimpleNamespace(lora_manager=_Manager())

    @property
    def manager(self) -> _Manager:
        return self.model_runner.lora_manager


def _request(name: str, lora_id: int, path: Path) -> LoRARequest:
    return LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=str(path))


def _prefetch(worker: _Worker, request: LoRARequest) -> None:
    """The RPC, which must return while the load is still held at the gate."""
    done = threading.Event()
    threading.Thread(target=lambda: (worker.loraserve_prefetch_lora(*_args(request)), done.set())).start()
    assert done.wait(5.0), "loraserve_prefetch_lora waited for the load: it ran on the engine's thread"


def _args(request: LoRARequest) -> tuple[str, int, str]:
    return request.lora_name, request.lora_int_id, request.lora_path


def _wait_done(worker: _Worker, lora_id: int) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not worker.loraserve_prefetch_done(lora_id):
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.fixture
def adapters(demo_assets) -> dict[str, Path]:
    """The demo adapters, from the session's build (a fresh clone has none until the fixture builds them)."""
    return demo_assets.adapters


def _corrupt(tmp_path: Path, source: Path) -> Path:
    bad = tmp_path / "corrupt"
    shutil.copytree(source, bad)
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a header cut short
    return bad


def _biased(tmp_path: Path, source: Path) -> Path:
    bad = tmp_path / "biased"
    shutil.copytree(source, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "bias": "all"}))
    return bad


def test_the_adapter_is_built_off_the_calling_thread_and_handed_to_the_step(adapters: dict[str, Path]) -> None:
    worker = _Worker()
    request = _request("code", 7, adapters["code"])
    _prefetch(worker, request)
    assert worker.loraserve_prefetch_done(7) is False  # still loading, and the RPC already answered
    worker.manager.gate.set()
    _wait_done(worker, 7)
    model = worker.manager._load_adapter(request)  # what add_lora calls inside the step: now the handoff
    assert isinstance(model, LoRAModel) and model.id == 7 and model.loras  # vLLM built it from the files
    assert worker.manager.threads and threading.get_ident() not in worker.manager.threads
    assert len(worker.manager.threads) == 1  # the step did not read the files again
    assert worker.loraserve_prefetch_done(7) is True  # handed over: nothing left pending


def _with_our_ops(worker: _Worker) -> dict[str, Any]:
    """Give the worker's model manager lora_ops' punica wrapper and layer 0 of the demo base (hidden 128, 2 heads
    of 64, 1 KV head, intermediate 384) as vLLM's LoRA layers, with vLLM's own name lookup; returns the layers."""
    from vllm.lora.layers import (
        MergedColumnParallelLinearWithLoRA,
        MergedQKVParallelLinearWithLoRA,
        RowParallelLinearWithLoRA,
    )
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear

    from lora_ops.punica_cpu import GroupedPunicaWrapperCPU

    config = worker.manager.lora_config
    f32, prefix = torch.float32, "model.layers.0."
    layers = {
        "self_attn.qkv_proj": MergedQKVParallelLinearWithLoRA(QKVParallelLinear(128, 64, 2, 1, params_dtype=f32)),
        "self_attn.o_proj": RowParallelLinearWithLoRA(RowParallelLinear(128, 128, params_dtype=f32)),
        "mlp.gate_up_proj": MergedColumnParallelLinearWithLoRA(
            MergedColumnParallelLinear(128, [384, 384], params_dtype=f32)
        ),
        "mlp.down_proj": RowParallelLinearWithLoRA(RowParallelLinear(384, 128, params_dtype=f32)),
    }
    for layer in layers.values():
        layer.create_lora_weights(config.max_loras, config)
    manager = worker.manager._adapter_manager
    manager.punica_wrapper_mapping = {"model": GroupedPunicaWrapperCPU(64, config.max_loras, torch.device("cpu"))}
    manager.modules = {prefix + name: layer for name, layer in layers.items()}
    manager.packed_modules = {
        prefix + "self_attn.qkv_proj": [prefix + f"self_attn.{x}_proj" for x in "qkv"],
        prefix + "mlp.gate_up_proj": [prefix + "mlp.gate_proj", prefix + "mlp.up_proj"],
    }
    manager.is_pooling_model = False
    manager._get_lora_layer_weights = lambda model, name: LoRAModelManager._get_lora_layer_weights(manager, model, name)
    return manager.modules


def test_with_our_ops_the_adapters_forms_are_built_before_it_is_handed_over(
    adapters: dict[str, Path],
    vllm_world,  # noqa: F811
) -> None:
    """The background job also builds the adapter's forms for every LoRA layer (``lora_ops.ready``), keyed by the
    tensor vLLM's ``set_lora`` will get (q's A for qkv, gate's A for gate_up), before the step takes the model."""
    from lora_ops import slots

    worker = _Worker()
    modules = _with_our_ops(worker)
    worker.manager.gate.set()
    request = _request("code", 8, adapters["code"])
    worker.loraserve_prefetch_lora(*_args(request))
    _wait_done(worker, 8)
    model = worker.manager._load_adapter(request)
    first = {"self_attn.qkv_proj": "self_attn.q_proj", "mlp.gate_up_proj": "mlp.gate_proj"}
    for name, layer in modules.items():
        short = name.removeprefix("model.layers.0.")
        source = model.loras["model.layers.0." + first.get(short, short)].lora_a
        form = slots.take_ready(layer.lora_a_stacked, source)
        assert form is not None and form.rows == 8 and form.nonzero


def test_a_failed_form_build_is_logged_and_the_adapter_still_loads(
    adapters: dict[str, Path],
    vllm_world,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The forms are an optimisation: a layer they cannot be built for leaves them to the step, loudly."""
    worker = _Worker()
    modules = _with_our_ops(worker)
    modules["model.layers.0.mlp.down_proj"].lora_a_stacked[0].resize_(1, 1, 16, 7)  # no longer the adapter's shape
    worker.manager.gate.set()
    request = _request("code", 9, adapters["code"])
    worker.loraserve_prefetch_lora(*_args(request))
    _wait_done(worker, 9)
    assert worker.manager._load_adapter(request).id == 9
    assert "building adapter code's LoRA forms off the step failed" in caplog.text


def test_a_loading_thread_that_shares_the_engines_cores_runs_at_the_lowest_priority(
    adapters: dict[str, Path],
) -> None:
    """Started from a thread bound to every core (no other core to move to), the loader stays there at nice 19."""
    worker = _Worker()
    worker.manager.gate.set()
    nice: list[int] = []
    original = worker.manager._load_adapter

    def spy(request: LoRARequest) -> Any:  # wraps the load the extension runs in its thread
        nice.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return original(request)

    worker.manager._load_adapter = spy  # type: ignore[method-assign,assignment]
    worker.loraserve_prefetch_lora("code", 3, str(adapters["code"]))
    _wait_done(worker, 3)
    assert nice == [LOADER_NICE]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a core besides the engine's")
def test_the_loading_thread_runs_off_the_engines_core(adapters: dict[str, Path]) -> None:
    """vLLM binds its CPU worker's thread to the engine's cores; the loader, started from it, leaves them, and
    keeps the engine thread's priority there (lowered, it stalled the step whenever it was preempted holding
    the GIL: ``serving.lora_residency._place_thread``)."""
    engine_core = min(os.sched_getaffinity(0))
    worker = _Worker()
    worker.manager.gate.set()
    cores: list[set[int]] = []
    nice: list[int] = []
    original = worker.manager._load_adapter

    def spy(request: LoRARequest) -> Any:
        cores.append(os.sched_getaffinity(0))  # the calling thread's own set
        nice.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return original(request)

    def as_the_engine() -> None:
        os.sched_setaffinity(0, {engine_core})  # this thread only, as vLLM binds the worker's
        worker.loraserve_prefetch_lora("code", 4, str(adapters["code"]))

    worker.manager._load_adapter = spy  # type: ignore[method-assign,assignment]
    starter = threading.Thread(target=as_the_engine)
    starter.start()
    starter.join()
    _wait_done(worker, 4)
    assert cores and cores[0] and engine_core not in cores[0]
    assert nice == [os.getpriority(os.PRIO_PROCESS, threading.get_native_id())]  # the starter's: this thread's


@pytest.mark.parametrize(
    ("make_bad", "message"),
    [(_corrupt, "header"), (_biased, "Adapter bias is not supported")],
)
def test_a_bad_adapter_fails_the_step_load_with_vllms_error_and_the_next_load_still_works(
    tmp_path: Path, adapters: dict[str, Path], make_bad, message: str
) -> None:
    worker = _Worker()
    worker.manager.gate.set()
    bad = _request("bad", 5, make_bad(tmp_path, adapters["code"]))
    worker.loraserve_prefetch_lora(*_args(bad))
    _wait_done(worker, 5)
    with pytest.raises(Exception, match=message):  # raised where add_lora's own load would raise it
        worker.manager._load_adapter(bad)
    good = _request("code", 6, adapters["code"])
    worker.loraserve_prefetch_lora(*_args(good))
    _wait_done(worker, 6)
    assert worker.manager._load_adapter(good).id == 6


def test_a_load_nobody_prefetched_or_for_other_files_runs_in_the_step(adapters: dict[str, Path]) -> None:
    worker = _Worker()
    worker.manager.gate.set()
    code, legal = adapters["code"], adapters["legal"]
    worker.loraserve_prefetch_lora("code", 9, str(code))
    _wait_done(worker, 9)
    reload = worker.manager._load_adapter(_request("legal", 9, legal))  # same id, other files: never the prefetch
    assert reload.id == 9 and threading.get_ident() in worker.manager.threads
    assert worker.manager._load_adapter(_request("code", 10, code)).id == 10  # never prefetched: loads here


def test_an_id_in_the_host_cache_is_not_built_again_and_a_build_the_step_overtook_is_dropped(
    adapters: dict[str, Path],
) -> None:
    worker = _Worker()
    worker.manager.gate.set()
    code = adapters["code"]
    worker.manager.cached = {4}
    worker.loraserve_prefetch_lora("code", 4, str(code))  # add_lora of a cached id only touches it
    assert worker.manager.threads == [] and worker._loraserve_lora_loader.loads == {}
    worker.loraserve_prefetch_lora("code", 8, str(code))
    _wait_done(worker, 8)
    worker.manager.cached = {4, 8}  # the step loaded 8 itself before add_lora came: add_lora will not take it
    worker.loraserve_prefetch_lora("legal", 11, str(adapters["legal"]))
    _wait_done(worker, 11)
    assert set(worker._loraserve_lora_loader.loads) == {11}  # 8's model is no longer held
