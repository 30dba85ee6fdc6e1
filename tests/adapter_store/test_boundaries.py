"""adapter_store must never pull in vLLM or FastAPI (serving depends on it, not the other way round), and the rest
of the code uses it through its façade only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path


def test_importing_every_module_loads_neither_vllm_nor_fastapi() -> None:
    code = (
        "import pkgutil, sys, importlib, adapter_store\n"
        "for m in pkgutil.iter_modules(adapter_store.__path__): importlib.import_module('adapter_store.' + m.name)\n"
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'vllm', 'fastapi', 'starlette', 'serving'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


ROOT = Path(__file__).resolve().parents[2]
OUTSIDE = ("serving", "loadtests", "checkpoints", "routing", "lora_ops", "bitnet")


def _store_imports(tree: ast.AST) -> list[str]:
    """Modules of ``adapter_store`` (not the package itself) that ``tree`` imports."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return [n for n in names if n.startswith("adapter_store.")]


def test_code_outside_the_store_uses_only_its_facade() -> None:
    """Everything else reaches adapters through the ``adapter_store`` package (``AdapterStore`` and its records),
    never through a module of it, and never through the store's private registry or disk cache."""
    offenders = []
    for package in OUTSIDE:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            offenders += [f"{path.relative_to(ROOT)}: imports {m}" for m in _store_imports(tree)]
            offenders += [
                f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}"
                for node in ast.walk(tree)
                if isinstance(node, ast.Attribute) and node.attr in ("_registry", "_cache", "_sources", "_uploads")
            ]
    assert offenders == []
