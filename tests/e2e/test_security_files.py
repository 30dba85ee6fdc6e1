"""Hostile adapter files through the real server (issue #13: sources, digest, validation).

The shared ``limited`` server (tests/e2e/conftest.py), called with this
module's admin key, with a local source root and an S3 source (a real S3 API:
moto in server mode). Each test sends what an attacker, or a careless tenant, could
put in a source or an upload: S3 keys that climb out of the staging directory,
hard links to secrets, and configs or tensors that vLLM's loader refuses by
raising inside the engine step. Each must get a 400 naming the problem, write
nothing outside the store, register nothing, and leave the server serving the
demo adapters.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import DemoAssets
from tests.conftest import RunningServer
from tests.e2e.adapter_files import CONFIG, WEIGHTS, copy_adapter
from tests.e2e.conftest import BUCKET, PREFIX, keys_of

pytestmark = pytest.mark.engine

ADMIN = {"Authorization": f"Bearer {keys_of('files')['admin']}"}


@dataclass
class Files:
    server: RunningServer
    workdir: Path
    volume: Path  # the local source root
    outside: Path  # a directory no source may write or read
    s3_endpoint: str
    demo: DemoAssets

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def files(limited: RunningServer, demo_assets, s3_server: str) -> Files:
    """The shared ``limited`` server seen as this module needs it."""
    workdir = limited.log_path.parent  # the server's: its store, its volume, and beside them a directory outside
    (workdir / "outside").mkdir(exist_ok=True)
    volume = Path(limited.config["store"]["sources"][0]["roots"][0])
    return Files(limited, workdir, volume, workdir / "outside", s3_server, demo_assets)


def error_of(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def registry(url: str) -> dict:
    response = httpx.get(f"{url}/v1/adapters", headers=ADMIN, timeout=60)
    assert response.status_code == 200, response.text
    return {a["name"]: [v["id"] for v in a["versions"]] for a in response.json()["data"]}


def still_serving(files: Files) -> None:
    """/health is 200 and the demo adapter `code` answers a completion."""
    assert httpx.get(f"{files.url}/health", headers=ADMIN, timeout=30).status_code == 200
    body = {"model": "code", "prompt": "def add(a, b):", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"{files.url}/v1/completions", json=body, headers=ADMIN, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "code" and response.json()["usage"]["completion_tokens"] == 4


def put_adapter(files: Files, directory: Path, key_prefix: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=files.s3_endpoint)
    for path in sorted(directory.iterdir()):
        client.put_object(Bucket=BUCKET, Key=key_prefix + path.name, Body=path.read_bytes())


# -- (a) S3 keys that would write outside the staging directory ------------------------------------


@pytest.mark.parametrize("shape", ["double-slash", "dot-dot"])
def test_s3_keys_that_leave_staging_are_refused(files: Files, shape: str) -> None:
    import boto3

    victim = files.outside / f"pwned-{shape}" / "adapter_config.json"
    name = f"evil-{shape}"
    key_prefix = f"{PREFIX}{name}/"
    put_adapter(files, copy_adapter(files.demo.adapters["code"], files.workdir / name), key_prefix)
    # "<prefix>//<absolute path>" made an absolute path of the key's tail; ".." parts climb out.
    tail = str(victim) if shape == "double-slash" else f"../../../../outside/pwned-{shape}/adapter_config.json"
    boto3.client("s3", endpoint_url=files.s3_endpoint).put_object(
        Bucket=BUCKET, Key=key_prefix + tail, Body=b'{"peft_type": "LORA"}'
    )
    before = registry(files.url)
    body = {"name": name, "source": f"s3://{BUCKET}/{key_prefix}", "check": False}
    error = error_of(httpx.post(f"{files.url}/v1/adapters", json=body, headers=ADMIN, timeout=120))
    assert error["code"] == "source_refused" and error["param"] == "source"
    assert "unsafe name" in error["message"]
    assert not victim.exists() and not victim.parent.exists()
    staging = files.workdir / "store" / "staging"
    assert list(staging.iterdir()) == []
    assert registry(files.url) == before
    still_serving(files)


def test_a_hard_link_to_a_secret_is_not_copied(files: Files) -> None:
    secret = files.outside / "token.txt"
    secret.write_text("sk-secret")
    adapter = copy_adapter(files.demo.adapters["code"], files.volume / "linked")
    os.link(secret, adapter / "README.md")
    before = registry(files.url)
    body = {"name": "linked", "source": str(adapter), "check": False}
    error = error_of(httpx.post(f"{files.url}/v1/adapters", json=body, headers=ADMIN, timeout=120))
    assert error["code"] == "source_refused" and "2 hard links" in error["message"]
    assert "sk-secret" not in error["message"]
    assert registry(files.url) == before
    still_serving(files)


# -- (b) configs and tensors vLLM's loader refuses (it would raise inside the engine step) ---------


def _config(**changes) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        config = json.loads((d / CONFIG).read_text())
        config.update(changes)
        (d / CONFIG).write_text(json.dumps(config))

    return edit


def _alpha_1e400(d: Path) -> None:
    config = json.loads((d / CONFIG).read_text())
    config["lora_alpha"] = "ALPHA"
    (d / CONFIG).write_text(json.dumps(config).replace('"ALPHA"', "1e400"))


def _first_a(tensors: dict[str, torch.Tensor]) -> str:
    return next(k for k in sorted(tensors) if "lora_A" in k)


def _tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        tensors = load_file(d / WEIGHTS)
        edit(tensors)
        save_file(tensors, d / WEIGHTS)

    return apply


def _huge_layer_index(tensors: dict[str, torch.Tensor]) -> None:
    key = _first_a(tensors)
    tensors[key.replace("layers.0.", "layers." + "7" * 5000 + ".")] = tensors.pop(key)


def _zero_dim(tensors: dict[str, torch.Tensor]) -> None:
    tensors[_first_a(tensors)] = torch.tensor(1.0)


# case -> (how to break a copy of `code`, the error code, a fragment of the message or param)
REFUSED: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "bias_all": (_config(bias="all"), "unsupported", "bias"),
    "modules_to_save_lm_head": (_config(modules_to_save=["lm_head"]), "unsupported", "modules_to_save"),
    "layer_replication": (_config(layer_replication=[[0, 1]]), "unsupported", "layer_replication"),
    "init_pissa": (_config(init_lora_weights="pissa"), "unsupported", "init_lora_weights"),
    "lora_alpha_string": (_config(lora_alpha="x"), "invalid_config", "lora_alpha"),
    "lora_alpha_1e400": (_alpha_1e400, "invalid_config", "adapter_config.json"),
    "layer_index_5000_digits": (_tensors(_huge_layer_index), "wrong_shape", "names no layer"),
    "zero_dim_tensor": (_tensors(_zero_dim), "wrong_shape", "has shape []"),
}


def upload(url: str, name: str, directory: Path) -> httpx.Response:
    parts = [("files", (p.name, p.read_bytes())) for p in sorted(directory.iterdir())]
    return httpx.post(
        f"{url}/v1/adapters/{name}/versions", files=parts, data={"check": "false"}, headers=ADMIN, timeout=300
    )


@pytest.mark.parametrize("route", ["register", "upload"])
@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_adapters_the_engine_would_refuse_are_invalid_not_fatal(files: Files, kind: str, route: str) -> None:
    edit, code, fragment = REFUSED[kind]
    name = f"bad-{kind.replace('_', '-')}-{route}"
    directory = copy_adapter(files.demo.adapters["code"], files.volume / name)
    edit(directory)
    before = registry(files.url)
    if route == "register":
        response = httpx.post(
            f"{files.url}/v1/adapters", json={"name": name, "source": str(directory)}, headers=ADMIN, timeout=300
        )
    else:
        response = upload(files.url, name, directory)
    error = error_of(response)
    assert error["code"] == code, error
    assert fragment in error["message"] or fragment == error["param"], error
    assert error["type"] == "BadRequestError"
    assert registry(files.url) == before
    models = {m["id"] for m in httpx.get(f"{files.url}/v1/models", headers=ADMIN, timeout=30).json()["data"]}
    assert name not in models and "code" in models
    still_serving(files)
