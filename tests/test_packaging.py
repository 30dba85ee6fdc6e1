"""The wheel ships everything an installed ``loraserve`` needs, not only what a checkout has.

The wheel is built once from a copy of the sources (pyproject.toml, README.md and
the packages; no build/ or egg-info left in the checkout) without build isolation:
the machines this project runs on have no package index. An installed package is
then stood in for by the unpacked wheel on ``PYTHONPATH``, run from a directory
that holds no checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_boundaries import PACKAGES

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # builds a wheel and runs the installed CLI in fresh interpreters


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            str(out),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("loraserve-*.whl")
    with zipfile.ZipFile(path) as zf:
        yield zf


@pytest.fixture(scope="module")
def installed(wheel: zipfile.ZipFile, tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("site")
    wheel.extractall(site)
    return site


def _dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in wheel.namelist() if n.endswith(f".dist-info/{name}")]
    return wheel.read(path).decode()


def test_wheel_has_every_module_of_every_package(wheel: zipfile.ZipFile) -> None:
    """Every module of every package: a package left out of ``packages.find`` would be missing."""
    expected = {
        p.relative_to(REPO).as_posix()
        for package in PACKAGES
        for p in (REPO / package).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    shipped = {n for n in wheel.namelist() if n.endswith(".py")}
    assert expected - shipped == set(), "missing from the wheel"
    assert {n.split("/")[0] for n in shipped} == set(PACKAGES)  # no tests/, no stray top-level modules


@pytest.mark.parametrize(
    "path",
    [
        "loadtests/locustfile.py",  # run by path: locust -f
        "adapter_store/migrations/script.py.mako",  # Alembic's template for new registry revisions
        "adapter_store/migrations/alembic.ini",
        "lora_ops/csrc/token_lora.cpp",  # compiled where the wheel is installed (lora_ops/kernel.py)
        *(p.relative_to(REPO).as_posix() for p in sorted((REPO / "checkpoints" / "data").glob("*.txt"))),
    ],
)
def test_wheel_has_files_read_by_path(wheel: zipfile.ZipFile, path: str) -> None:
    assert wheel.read(path) == (REPO / path).read_bytes()


@pytest.mark.parametrize(
    ("group", "name", "target"),
    [
        ("console_scripts", "loraserve", "serving.cli:main"),
        ("vllm.general_plugins", "loraserve_lora_ops", "lora_ops:register"),
        ("vllm.general_plugins", "loraserve_bitnet", "bitnet:register"),
    ],
)
def test_entry_points(wheel: zipfile.ZipFile, group: str, name: str, target: str) -> None:
    text = _dist_info(wheel, "entry_points.txt")
    section = text.split(f"[{group}]\n", 1)[1].split("\n[", 1)[0]
    assert f"{name} = {target}" in section.splitlines()


def test_license_is_an_spdx_expression(wheel: zipfile.ZipFile) -> None:
    assert "License-Expression: Apache-2.0" in _dist_info(wheel, "METADATA").splitlines()


def _run_installed(installed: Path, cwd: Path, code: str) -> Any:
    """Run ``code`` (it prints JSON) with only the unpacked wheel on the path, outside the checkout."""
    env = {**os.environ, "PYTHONPATH": str(installed)}
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_loadtest_finds_its_locustfile_when_installed(installed: Path, tmp_path: Path) -> None:
    """``loraserve loadtest``'s default locustfile is the installed package's own file."""
    code = (
        "import json, serving.cli as cli\n"
        "args = cli.build_parser().parse_args(['loadtest', '--host', 'http://127.0.0.1:1'])\n"
        "print(json.dumps([cli.__file__, str(args.locustfile), args.locustfile.is_file()]))\n"
    )
    cli_file, locustfile, exists = _run_installed(installed, tmp_path, code)
    assert Path(cli_file).is_relative_to(installed)  # the unpacked wheel, not the checkout
    assert Path(locustfile) == (installed / "loadtests" / "locustfile.py").resolve()
    assert exists


def test_installed_registry_runs_its_migrations(installed: Path, tmp_path: Path) -> None:
    """The registry creates its tables with the Alembic scripts inside the installed package."""
    code = (
        "import json, pathlib, adapter_store.migrations as m\n"
        "from adapter_store.registry import AdapterRegistry\n"
        "r = AdapterRegistry(pathlib.Path('store'))\n"
        "print(json.dumps([m.__file__, r.names()]))\n"
    )
    migrations_file, names = _run_installed(installed, tmp_path, code)
    assert Path(migrations_file).is_relative_to(installed) and names == []
