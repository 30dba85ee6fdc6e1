"""The adapter store through the real server: register, upload, versions, aliases, pins, delete, restart,
validation and source confinement, upload limits, health probes, and the ``base`` fallback policy.

Outputs are compared with the server's own answers for the configured demo
adapters on the same files (``code``, ``legal``, ``medical``), which
``test_reference.py`` checks against transformers + PEFT: a version made of
the code adapter's files must answer token for token like ``code``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, RunningServer, demo_config, start_server, stop_server
from tests.e2e.adapter_files import BROKEN, broken_adapter, copy_adapter, nan_adapter

PROMPT = "Please explain how it works"
TOKENS = 12
UPLOAD_LIMIT = 400_000  # bytes; a demo adapter is ~170 kB, so two fit in one body but not three


@dataclass
class Store:
    """The module's server (replaced by the restart test) and its directories."""

    server: RunningServer
    workdir: Path
    volume: Path  # the configured local source root
    outside: Path  # a directory no source may read
    demo: object

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def store(demo_assets, tmp_path_factory) -> Iterator[Store]:
    workdir = tmp_path_factory.mktemp("adapter-admin")
    volume, outside = workdir / "volume", workdir / "outside"
    volume.mkdir()
    outside.mkdir()
    config = demo_config(demo_assets)
    config["store"] = {
        "root": str(workdir / "store"),
        "sources": [{"type": "local", "roots": [str(volume)]}],
        "fallback": "base",
        "max_adapter_bytes": 1 << 20,
    }
    config["limits"] = {"max_upload_bytes": UPLOAD_LIMIT}
    state = Store(start_server(config, workdir), workdir, volume, outside, demo_assets)
    yield state
    stop_server(state.server)


def generate(url: str, model: str, **extra) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}
    return httpx.post(f"{url}/v1/completions", json=body | extra, timeout=120)


def tokens(url: str, model: str) -> str:
    response = generate(url, model)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def upload(url: str, name: str, directory: Path, **form) -> httpx.Response:
    files = [("files", (p.name, p.read_bytes())) for p in sorted(directory.iterdir())]
    return httpx.post(f"{url}/v1/adapters/{name}/versions", files=files, data=form, timeout=300)


def registry(url: str) -> dict[str, tuple[dict, list[str]]]:
    """name -> (aliases, version ids): what registering or deleting changes."""
    response = httpx.get(f"{url}/v1/adapters", timeout=30)
    assert response.status_code == 200, response.text
    return {a["name"]: (a["aliases"], [v["id"] for v in a["versions"]]) for a in response.json()["data"]}


def test_register_upload_versions_and_aliases(store: Store) -> None:
    code, legal = tokens(store.url, "code"), tokens(store.url, "legal")
    assert code != legal
    source = copy_adapter(store.demo.adapters["code"], store.volume / "custom")
    response = httpx.post(
        f"{store.url}/v1/adapters", json={"name": "custom", "source": str(source), "aliases": ["stable"]}, timeout=300
    )
    assert response.status_code == 201, response.text
    v1 = response.json()
    assert v1["info"]["health"] == "ok" and v1["info"]["aliases"] == ["latest", "stable"]
    assert tokens(store.url, "custom") == code

    response = upload(store.url, "custom", copy_adapter(store.demo.adapters["legal"], store.workdir / "up-legal"))
    assert response.status_code == 201, response.text
    v2 = response.json()
    assert v2["source"] == f"upload:{v2['info']['version']}" and v2["info"]["aliases"] == ["latest"]
    assert tokens(store.url, "custom") == legal  # latest moved
    assert tokens(store.url, f"custom@{v1['info']['version'][:12]}") == code  # the old version keeps its weights
    assert tokens(store.url, "custom@stable") == code

    response = httpx.put(f"{store.url}/v1/adapters/custom/aliases/stable", json={"version": v2["info"]["version"]})
    assert response.status_code == 200, response.text
    assert tokens(store.url, "custom@stable") == legal

    models = {m["id"]: m for m in httpx.get(f"{store.url}/v1/models").json()["data"]}
    assert models["custom"]["adapter"]["version"] == v2["info"]["version"]
    assert models["custom"]["adapter"]["aliases"] == ["latest", "stable"]
    assert (
        models["custom"]["adapter"]["rank"] == v1["info"]["rank"]
        and models["custom"]["parent"] == "loraserve-demo-base"
    )


def test_cli_lists_shows_pins_and_deletes(store: Store) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "serving.cli", "adapters", "--url", store.url, *args]
        return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)

    listed = cli("list")
    assert listed.returncode == 0, listed.stderr
    assert '"name": "custom"' in listed.stdout
    source = copy_adapter(store.demo.adapters["medical"], store.volume / "temp", scale=0.5)
    assert cli("register", "temp", str(source)).returncode == 0
    assert cli("pin", "temp").returncode == 0
    refused = cli("delete", "temp")
    assert refused.returncode == 1 and "pinned" in refused.stderr
    assert cli("unpin", "temp").returncode == 0
    unloaded = cli("unload", "temp")
    assert unloaded.returncode == 0 and '"unloaded": true' in unloaded.stdout  # pinning loaded it
    assert cli("delete", "temp").returncode == 0
    missing = cli("show", "temp")
    assert missing.returncode == 1 and "404" in missing.stderr
    assert generate(store.url, "temp").status_code == 404


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_invalid_uploads_are_refused_and_change_nothing(store: Store, kind: str) -> None:
    before = registry(store.url)
    directory = broken_adapter(store.demo.adapters["code"], store.workdir / f"broken-{kind}", kind)
    response = upload(store.url, "custom", directory)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == BROKEN[kind][1], error
    assert registry(store.url) == before
    assert tokens(store.url, "custom") == tokens(store.url, "legal")  # still the version set before


TRAVERSALS = {
    "dot_dot": lambda s: f"{s.volume}/../outside/evil",
    "absolute_outside": lambda s: str(s.outside / "evil"),
    "file_uri_outside": lambda s: (s.outside / "evil").as_uri(),
    "symlink_out": lambda s: str(s.volume / "link"),
    "relative": lambda s: "evil",
}


@pytest.mark.parametrize("kind", sorted(TRAVERSALS))
def test_sources_outside_the_roots_are_refused(store: Store, kind: str) -> None:
    copy_adapter(store.demo.adapters["code"], store.outside / "evil")
    if not (store.volume / "link").exists():
        (store.volume / "link").symlink_to(store.outside / "evil")
    before = registry(store.url)
    body = {"name": "evil", "source": TRAVERSALS[kind](store)}
    response = httpx.post(f"{store.url}/v1/adapters", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "source_refused"
    assert registry(store.url) == before and generate(store.url, "evil").status_code == 404


def test_upload_names_and_size_are_limited(store: Store) -> None:
    files = [("files", ("../adapter_config.json", b"{}"))]
    response = httpx.post(f"{store.url}/v1/adapters/evil/versions", files=files, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "files"
    big = [("files", (f"part{i}.safetensors", os.urandom(UPLOAD_LIMIT // 2))) for i in range(3)]
    response = httpx.post(f"{store.url}/v1/adapters/evil/versions", files=big, timeout=60)
    assert response.status_code == 413, response.text
    assert "limits.max_upload_bytes" in response.json()["error"]["message"]
    assert "evil" not in registry(store.url)


def test_nan_adapter_fails_its_health_check_and_falls_back(store: Store) -> None:
    response = upload(store.url, "broken", nan_adapter(store.demo.adapters["medical"], store.workdir / "nan"))
    assert response.status_code == 201, response.text
    health = httpx.get(f"{store.url}/v1/adapters/broken/health").json()
    assert health["state"] == "failed" and "non-finite" in health["reason"], health
    response = generate(store.url, "broken")
    assert response.status_code == 200, response.text
    assert response.headers["X-Adapter-Fallback"] == "base"
    assert response.headers["X-Adapter-Fallback-Reason"] == "health_check_failed"
    assert response.json()["choices"][0]["text"] == tokens(store.url, "loraserve-demo-base")


def test_corrupt_adapter_under_load_falls_back_to_base(store: Store) -> None:
    source = copy_adapter(store.demo.adapters["medical"], store.volume / "fragile", scale=1.5)
    response = httpx.post(f"{store.url}/v1/adapters", json={"name": "fragile", "source": str(source)}, timeout=300)
    assert response.status_code == 201, response.text
    digest = response.json()["info"]["version"]
    good = {m: tokens(store.url, m) for m in ("code", "legal", "medical", "loraserve-demo-base")}
    assert tokens(store.url, "fragile") not in good.values()
    for weights in (
        store.workdir / "store" / "cache" / digest / "adapter_model.safetensors",
        source / "adapter_model.safetensors",
    ):
        weights.write_bytes(weights.read_bytes()[:-100])  # the cached copy and the source: nothing intact is left

    async def burst() -> list[tuple[str, httpx.Response]]:
        models = [*good] * 3 + ["fragile"] * 4
        async with httpx.AsyncClient(timeout=300) as client:
            body = {"prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}
            calls = [client.post(f"{store.url}/v1/completions", json={**body, "model": m}) for m in models]
            return list(zip(models, await asyncio.gather(*calls), strict=True))

    for model, response in asyncio.run(burst()):
        assert response.status_code == 200, (model, response.text)
        text = response.json()["choices"][0]["text"]
        if model == "fragile":
            assert response.headers["X-Adapter-Fallback"] == "base"
            assert response.headers["X-Adapter-Fallback-Reason"] == "checksum_mismatch"
            assert text == good["loraserve-demo-base"]
        else:
            assert "X-Adapter-Fallback" not in response.headers and text == good[model]
    metrics = httpx.get(f"{store.url}/metrics").text
    assert 'loraserve_adapter_fallbacks_total{adapter="fragile",reason="checksum_mismatch"} 4.0' in metrics
    assert "loraserve_adapter_disk_cache_corrupt_total 1.0" in metrics


def test_everything_survives_a_restart(store: Store) -> None:
    before = registry(store.url)
    assert {"custom", "broken", "fragile", "code"} <= set(before)
    expected = {m: tokens(store.url, m) for m in ("custom", "custom@stable")}
    stop_server(store.server)
    store.server = start_server(store.server.config, store.workdir)
    assert registry(store.url) == before
    assert {m: tokens(store.url, m) for m in expected} == expected
