"""adapter_store must never pull in vLLM or FastAPI (serving depends on it, not the other way round)."""

from __future__ import annotations

import subprocess
import sys


def test_importing_every_module_loads_neither_vllm_nor_fastapi() -> None:
    code = (
        "import pkgutil, sys, importlib, adapter_store\n"
        "for m in pkgutil.iter_modules(adapter_store.__path__): importlib.import_module('adapter_store.' + m.name)\n"
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'vllm', 'fastapi', 'starlette', 'serving'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
