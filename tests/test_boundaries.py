"""The layering of our packages, read from the source with ``ast`` (nothing is imported).

Every ``import`` counts, also those inside functions and under ``TYPE_CHECKING``:
a lazy import is still a dependency, only a later one. The rules, and why:

* ``adapter_store/`` and ``routing/`` are libraries that serving uses: they know
  nothing of the process that serves, of checkpoint building or of load tests.
* ``lora_ops/`` and ``bitnet/`` are vLLM plugins, loaded by vLLM in every process
  it starts (also a plain ``vllm serve``): they import nothing of ours.
* ``checkpoints/`` builds models and adapters for the demo and the tests: it may
  use the plugins and libraries, never the server or the load tests.
* ``loraserve loadtest`` (``serving.cli``) imports ``loadtests.runner``, which
  with what it loads must not import ``serving`` back (no circle).
* No import circle among our modules at all.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("serving", "adapter_store", "routing", "lora_ops", "bitnet", "checkpoints", "loadtests")


@dataclass(frozen=True)
class Rule:
    """Modules named ``source`` (or inside it) import nothing named ``forbidden`` (or inside it)."""

    source: str
    forbidden: tuple[str, ...]
    why: str


def _others(*allowed: str) -> tuple[str, ...]:
    return tuple(p for p in PACKAGES if p not in allowed)


RULES = [
    Rule("adapter_store", ("serving", "checkpoints", "loadtests"), "a library serving uses"),
    Rule("routing", ("serving", "checkpoints", "loadtests"), "a library serving uses"),
    Rule("lora_ops", _others("lora_ops"), "a vLLM plugin: loaded by any vLLM process"),
    Rule("bitnet", _others("bitnet"), "a vLLM plugin: loaded by any vLLM process"),
    Rule("checkpoints", ("serving", "loadtests"), "builds checkpoints, serves nothing"),
    *(
        Rule(f"loadtests.{name}", ("serving",), "loaded by `loraserve loadtest` (serving.cli): no circle")
        for name in ("runner", "process", "summary", "locustfile")
    ),
]


def _inside(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def sources() -> dict[str, Path]:
    """Every module of ours: dotted name -> file."""
    return {_module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def _imported_names(module: str, path: Path) -> set[str]:
    """Dotted names ``module`` imports: ``import a.b`` -> a.b; ``from a import b`` -> a.b and a."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y, from .. import z
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


@cache
def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (``from a import b``: a.b if b is a module, else a)."""
    known = sources()
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        targets = set()
        for name in _imported_names(module, path):
            while name and name not in known:  # a.b.Class -> a.b; third-party names fall away
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        # `from a import b` runs `a` (its __init__) too: a submodule that imports its own package this way
        # is in a circle with it when the package's __init__ imports that submodule.
        graph[module] = targets
    return graph


def violations(graph: dict[str, set[str]], rule: Rule) -> list[str]:
    return sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if _inside(module, rule.source)
        for target in targets
        if any(_inside(target, f) for f in rule.forbidden)
    )


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (``[a, b, ..., a]``) by depth-first search, or None."""
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_real_imports() -> None:
    """The parser is not vacuous: known edges of each kind are found."""
    graph = import_graph()
    assert "adapter_store" in graph["loadtests.bench_store"]  # from adapter_store import X: the package
    assert "bitnet.packing" in graph["checkpoints.tiny_bitnet"]  # across packages
    assert "lora_ops.fused" in graph["lora_ops.punica_cpu"]  # relative import
    assert "loadtests.runner" in graph["serving.cli"]  # an import inside a function
    assert "bitnet.quant" in graph["bitnet"]  # `import bitnet.quant` inside register()


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.source)
def test_layer_imports_nothing_forbidden(rule: Rule) -> None:
    assert any(_inside(m, rule.source) for m in sources()), f"no module {rule.source}: a stale rule"
    bad = violations(import_graph(), rule)
    assert not bad, f"{rule.source} ({rule.why}) must not import {', '.join(rule.forbidden)}:\n  " + "\n  ".join(bad)


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(
    ("graph", "cycle"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, None),  # a diamond is no circle
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b"}, "b": {"b2"}, "b2": {"b"}}, ["b", "b2", "b"]),
    ],
)
def test_find_cycle(graph: dict[str, set[str]], cycle: list[str] | None) -> None:
    assert find_cycle(graph) == cycle


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_says_what_it_owns(package: str) -> None:
    doc = ast.get_docstring(ast.parse((REPO / package / "__init__.py").read_text())) or ""
    assert len(doc.split()) >= 25, f"{package}/__init__.py needs a paragraph on what it owns and must not depend on"


# Importing these (with every submodule where marked) must not load the named top-level modules, checked in
# a fresh interpreter: this also catches a dependency that arrives through a third-party library.
RUNTIME = [
    ("adapter_store", True, ("vllm", "fastapi", "starlette", "serving")),  # pure: storage and validation
    ("routing", True, ("vllm", "fastapi", "starlette", "serving")),
    ("lora_ops", False, ("vllm", "torch", "serving")),  # vLLM imports the plugins in every process: cheap
    ("bitnet", False, ("vllm", "torch", "serving")),
    ("loadtests.runner", False, ("serving", "vllm", "torch")),  # `loraserve loadtest` starts fast, no circle
]


@pytest.mark.parametrize(("module", "submodules", "absent"), RUNTIME, ids=[m for m, _, _ in RUNTIME])
def test_importing_loads_nothing_heavy(module: str, submodules: bool, absent: tuple[str, ...]) -> None:
    code = (
        "import importlib, json, pkgutil, sys\n"
        f"m = importlib.import_module({module!r})\n"
        f"for info in pkgutil.iter_modules(m.__path__) if {submodules} else ():\n"
        "    importlib.import_module(m.__name__ + '.' + info.name)\n"
        "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    loaded = set(json.loads(out))
    assert module.split(".")[0] in loaded
    assert not loaded & set(absent), f"importing {module} loads {sorted(loaded & set(absent))}"


def test_code_outside_the_store_uses_only_its_facade() -> None:
    """Everything else reaches adapters through the ``adapter_store`` package (``AdapterStore`` and its records),
    never through a module of it, and never through the store's private registry, cache, sources or uploads."""
    offenders = []
    for module, path in sources().items():
        if _inside(module, "adapter_store"):
            continue
        imported = _imported_names(module, path) & sources().keys()  # modules only, not names from the package
        offenders += [f"{module}: imports {name}" for name in sorted(imported) if name.startswith("adapter_store.")]
        offenders += [
            f"{module}:{node.lineno}: .{node.attr}"
            for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Attribute) and node.attr in ("_registry", "_cache", "_sources", "_uploads")
        ]
    assert offenders == []
