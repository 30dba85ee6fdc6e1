"""The layers of ``serving/api``: dependencies point one way, read from the source with ``ast``.

The shared layer (the modules directly in ``serving/api/``: errors, protocol,
sampling, generation, streams, limits, auth, disconnect, ...) imports no
endpoint package; each endpoint package (a sub-package: chat, completions, ...)
imports the shared layer and itself, never another endpoint; ``app.py`` is the
one composition root that knows them all. Every import counts, including those
inside functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

API = Path(__file__).resolve().parents[3] / "serving" / "api"
PACKAGE = "serving.api"
ROOT = "app"  # the composition root

ENDPOINTS = sorted(p.name for p in API.iterdir() if (p / "__init__.py").is_file())
SHARED = sorted(p.stem for p in API.glob("*.py") if p.stem not in ("__init__", ROOT))


def imported_modules(source: str, package: str) -> set[str]:
    """Every module ``source`` imports, absolute (relative imports resolved against ``package``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from serving.api import chat`
    return found


def endpoints_in(source: str, package: str) -> set[str]:
    """The endpoint packages ``source`` (a module of ``package``) imports."""
    prefix = PACKAGE + "."
    tops = {
        name.removeprefix(prefix).split(".")[0] for name in imported_modules(source, package) if name.startswith(prefix)
    }
    return tops & set(ENDPOINTS)


def endpoints_imported(path: Path) -> set[str]:
    package = ".".join(path.relative_to(API.parent.parent).parts[:-1])
    return endpoints_in(path.read_text(), package)


def test_the_layers_are_found() -> None:
    """The test looks at the real tree (an empty glob would pass everything)."""
    assert {"chat", "completions", "models", "system", "prompt_routes", "adapters"} <= set(ENDPOINTS)
    assert {"errors", "protocol", "sampling", "generation", "streams", "limits", "auth", "disconnect"} <= set(SHARED)


@pytest.mark.parametrize("module", SHARED)
def test_shared_layer_imports_no_endpoint(module: str) -> None:
    assert endpoints_imported(API / f"{module}.py") == set()


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_endpoint_imports_only_the_shared_layer_and_itself(endpoint: str) -> None:
    others = set()
    for path in sorted((API / endpoint).rglob("*.py")):
        others |= endpoints_imported(path) - {endpoint}
    assert others == set()


def test_the_composition_root_wires_every_endpoint() -> None:
    assert endpoints_imported(API / f"{ROOT}.py") == set(ENDPOINTS)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from serving.api.chat.serving import ChatServing", {"chat"}),
        ("from serving.api import chat", {"chat"}),
        ("import serving.api.models.protocol", {"models"}),
        ("if TYPE_CHECKING:\n    from serving.api.completions import protocol", {"completions"}),
        ("def f():\n    from serving.api.system.api_router import engine", {"system"}),
        ("from serving.api.errors import ServingError\nfrom serving.api import auth", set()),
        ("from .chat import serving", {"chat"}),  # relative, from serving/api/x.py
    ],
)
def test_imports_are_seen_wherever_they_are(source: str, expected: set[str]) -> None:
    """The checker itself: a shared module with this source would (or would not) be flagged."""
    assert endpoints_in(source, PACKAGE) == expected


def state_names(source: str, *, written: bool) -> set[str]:
    """Attributes of ``state`` / ``app.state`` that ``source`` assigns (``written``) or reads."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store if written else ast.Load):
            owner = node.value
            if (isinstance(owner, ast.Name) and owner.id == "state") or (
                isinstance(owner, ast.Attribute) and owner.attr == "state"
            ):
                names.add(node.attr)
    return names


def test_every_object_an_endpoint_reads_from_app_state_is_put_there_by_the_root() -> None:
    """The endpoints find their serving objects by name on ``app.state``; a misspelt one would be a 500."""
    written = state_names((API / f"{ROOT}.py").read_text(), written=True)
    read = {
        endpoint: state_names((API / endpoint / "api_router.py").read_text(), written=False) for endpoint in ENDPOINTS
    }
    assert all(read.values())  # each endpoint reads its serving object (or the engine) from app.state
    assert {e: names - written for e, names in read.items()} == {e: set() for e in ENDPOINTS}
