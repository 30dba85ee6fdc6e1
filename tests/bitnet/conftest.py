"""Fixtures for BitNet unit tests: eager transformers references, a 1-rank vLLM world."""

from __future__ import annotations

import socket

import pytest
import torch


@pytest.fixture(autouse=True)
def eager_transformers():
    """transformers wraps BitNet's quantizers in torch.compile; the reference is their eager math."""
    with torch._dynamo.config.patch(disable=True):
        yield


@pytest.fixture(scope="session")
def vllm_world():
    """vLLM's parallel layers need a (1-rank, gloo) distributed world and a current config."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    with set_current_vllm_config(VllmConfig()):
        if not model_parallel_is_initialized():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            init_distributed_environment(
                world_size=1,
                rank=0,
                distributed_init_method=f"tcp://127.0.0.1:{port}",
                local_rank=0,
                backend="gloo",
            )
            initialize_model_parallel(1, 1)
        yield
