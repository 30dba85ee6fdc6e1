"""The per-token LoRA kernel (``csrc/token_lora.cpp``): built on this machine once, then loaded.

Why a kernel of our own: a decode step with as many adapters as tokens (16 requests over 100 adapters) has
no good form in torch ops. A matmul per adapter is call-bound (~100 us per adapter and linear); stacking
each token's weights first is copy-bound (it moves every byte the batched matmul then reads again). The
kernel reads each token's adapter where it lies, once, as punica's BGMV does on a GPU.

It is compiled with torch's own extension builder (g++ and ninja, as torch.compile's inductor needs on the
CPU anyway) into torch's extension cache (``TORCH_EXTENSIONS_DIR``, by default under ``~/.cache``), named by
a digest of its source and the torch version, so an upgrade builds it again and a second process finds it
built. ``make install`` and the CPU image build it ahead (``python -m lora_ops.kernel``); an engine that
finds it missing builds it at start-up (about 15 s), before its first step. The hot loops are cloned per
instruction set (AVX-512, AVX2, baseline) and the loader picks one, so a build runs on any x86 machine;
bfloat16 runs as bf16 pairs (``vdpbf16ps``) where the CPU has AVX512_BF16, checked at run time
(``native_bf16()``): 1.4-1.8x the widened loop on one thread, on an AMD EPYC
(``/tmp`` script, 16 decode tokens at ``bench_lora``'s realistic shape, one adapter or 4 or 16).

Where it cannot be built (no compiler), ``token_lora()`` logs why once and returns None, and the plan
runs each token's adapter by stacking its weights instead (``token_step.TokenStep``), slower but exact.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("csrc") / "token_lora.cpp"
CFLAGS = ["-O3", "-fopenmp"]  # OpenMP: at::parallel_for splits the tokens over torch's own thread pool

logger = logging.getLogger(__name__)

TokenLora = Callable[..., None]


def extension_name() -> str:
    """The build's name: a digest of the source, the flags and the torch version it links against."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join(CFLAGS).encode())
    digest.update(torch.__version__.encode())
    return f"loraserve_token_lora_{digest.hexdigest()[:12]}"


def build() -> ModuleType:
    """Compile (or find compiled) and import the kernel's module (a Python extension module, see the source's end).

    A module already built is imported directly: torch's builder takes a lock file and runs ninja on every
    load, and a process killed inside that window (an engine stopped during start-up) would leave the lock
    behind for every later engine to wait on."""
    from torch.utils import cpp_extension

    name = extension_name()
    library = Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so"
    if library.is_file():
        spec = importlib.util.spec_from_file_location(name, library)
        if spec is None or spec.loader is None:
            raise ImportError(f"{library} is not a loadable extension module")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    built: ModuleType = cpp_extension.load(
        name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], is_python_module=True
    )
    return built


@functools.cache
def _module() -> ModuleType | None:
    """The kernel's module, or None where this machine cannot build it (logged once, with the reason)."""
    try:
        return build()
    except (OSError, RuntimeError, ImportError, ValueError) as e:  # no compiler/ninja, or a failed build
        logger.warning("the per-token LoRA kernel could not be built (%s); mixed-adapter steps stack weights", e)
        return None


def token_lora() -> TokenLora | None:
    """The kernel's call, ``token_lora(y, x, forms, outs, scale, native_bf16=True)`` (see the source's header
    for its arguments), or None where this machine cannot build it."""
    module = _module()
    return None if module is None else module.token_lora


def native_bf16() -> bool:
    """Whether the kernel runs bfloat16 calls as bf16 pairs on this CPU (False where it cannot be built)."""
    module = _module()
    return module is not None and bool(module.native_bf16())


if __name__ == "__main__":  # make install / the image: build ahead of the first engine
    logging.basicConfig(level=logging.INFO)
    print(build().__file__)
