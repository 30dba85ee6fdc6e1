"""The adapter store through the real server: register, upload, versions, aliases, pins, delete, restart (by a
SIGTERM with a stream in flight, which must finish), validation and source confinement, upload limits, health
probes, and the ``base`` fallback policy.

Outputs are compared with the server's own answers for the configured demo
adapters on the same files (``code``, ``legal``, ``medical``), which
``test_reference.py`` checks against transformers + PEFT: a version made of
the code adapter's files must answer token for token like ``code``.

The server runs the ``base`` fallback policy, so every answer that should come
from an adapter is also checked to carry no ``X-Adapter-Fallback`` header.
Each test registers its own uniquely named adapters (``unique``) and leaves
nothing another test relies on: any subset runs in any order. The server is the
session's ``admin`` (tests/e2e/conftest.py), shared with
test_adapter_loaded_metric.py, whose tests do the same.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, start_server
from tests.e2e.adapter_files import BROKEN, WEIGHTS, broken_adapter, copy_adapter, nan_adapter
from tests.e2e.conftest import ADMIN_UPLOAD_LIMIT as UPLOAD_LIMIT
from tests.e2e.conftest import AdminServer as Store
from tests.e2e.faults import sigterm_during_a_stream

PROMPT = "Please explain how it works"
TOKENS = 12
BASE = "loraserve-demo-base"

pytestmark = pytest.mark.engine


@pytest.fixture
def store(admin: Store) -> Store:
    return admin


def generate(url: str, model: str, **extra) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}
    return httpx.post(f"{url}/v1/completions", json=body | extra, timeout=120)


def tokens(url: str, model: str) -> str:
    """The greedy text of ``model`` itself: a fallback answer (another model's text) fails here."""
    response = generate(url, model)
    assert response.status_code == 200, response.text
    assert "X-Adapter-Fallback" not in response.headers, (model, dict(response.headers))
    return response.json()["choices"][0]["text"]


def unique(prefix: str) -> str:
    """A name no other test (or earlier run against the same store) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def register(store: Store, name: str, domain: str, **extra) -> dict:
    """Register a copy of a demo adapter (``scale``: rescaled, so its own digest and outputs) from the volume."""
    source = copy_adapter(store.demo.adapters[domain], store.volume / name, scale=extra.pop("scale", None))
    body = {"name": name, "source": str(source), **extra}
    response = httpx.post(f"{store.url}/v1/adapters", json=body, timeout=300)
    assert response.status_code == 201, response.text
    return response.json()


def metric(url: str, sample: str) -> float:
    """One exposition line's value (``name{labels}`` exactly), 0 when the series does not exist yet."""
    match = re.search(rf"^{re.escape(sample)} (\S+)$", httpx.get(f"{url}/metrics").text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def upload(url: str, name: str, directory: Path, **form) -> httpx.Response:
    files = [("files", (p.name, p.read_bytes())) for p in sorted(directory.iterdir())]
    return httpx.post(f"{url}/v1/adapters/{name}/versions", files=files, data=form, timeout=300)


def registry(url: str) -> dict[str, tuple[dict, list[str]]]:
    """name -> (aliases, version ids): what registering or deleting changes."""
    response = httpx.get(f"{url}/v1/adapters", params={"limit": 1000}, timeout=30)
    assert response.status_code == 200, response.text
    return {a["name"]: (a["aliases"], [v["id"] for v in a["versions"]]) for a in response.json()["data"]}


def test_register_upload_versions_and_aliases(store: Store) -> None:
    code, legal = tokens(store.url, "code"), tokens(store.url, "legal")
    assert code != legal
    custom = unique("custom")
    v1 = register(store, custom, "code", aliases=["stable"])
    assert v1["info"]["health"] == "ok" and v1["info"]["aliases"] == ["latest", "stable"]
    assert tokens(store.url, custom) == code

    response = upload(store.url, custom, copy_adapter(store.demo.adapters["legal"], store.workdir / unique("up")))
    assert response.status_code == 201, response.text
    v2 = response.json()
    assert v2["source"] == f"upload:{v2['info']['version']}" and v2["info"]["aliases"] == ["latest"]
    assert tokens(store.url, custom) == legal  # latest moved
    assert tokens(store.url, f"{custom}@{v1['info']['version'][:12]}") == code  # the old version keeps its weights
    assert tokens(store.url, f"{custom}@stable") == code

    response = httpx.put(f"{store.url}/v1/adapters/{custom}/aliases/stable", json={"version": v2["info"]["version"]})
    assert response.status_code == 200, response.text
    assert tokens(store.url, f"{custom}@stable") == legal

    models = {m["id"]: m for m in httpx.get(f"{store.url}/v1/models").json()["data"]}
    assert models[custom]["adapter"]["version"] == v2["info"]["version"]
    assert models[custom]["adapter"]["aliases"] == ["latest", "stable"]
    assert models[custom]["adapter"]["rank"] == v1["info"]["rank"] and models[custom]["parent"] == BASE


def test_adapters_are_listed_in_pages(store: Store) -> None:
    prefix = unique("paged")
    names = [f"{prefix}-{i}" for i in range(5)]
    for name in names:
        register(store, name, "code", check=False)
    full = sorted(registry(store.url))
    assert set(names) <= set(full)
    pages, after = [], None
    for _ in range(len(full)):  # more pages than adapters: `after` is not followed
        params = {"limit": 2} | ({"after": after} if after else {})
        page = httpx.get(f"{store.url}/v1/adapters", params=params, timeout=30).json()
        listed = [a["name"] for a in page["data"]]
        assert len(listed) <= 2 and (page["first_id"], page["last_id"]) == (listed[0], listed[-1]), page
        pages.append(listed)
        if not page["has_more"]:
            break
        after = page["last_id"]
    else:
        pytest.fail(f"still has_more after {len(full)} pages")
    assert [name for listed in pages for name in listed] == full  # every adapter once, in name order
    too_many = httpx.get(f"{store.url}/v1/adapters", params={"limit": 1001}, timeout=30)
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "limit", too_many.text


def test_cli_lists_shows_pins_and_deletes(store: Store) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "serving.cli", "adapters", "--url", store.url, *args]
        return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)

    temp = unique("temp")
    source = copy_adapter(store.demo.adapters["medical"], store.volume / temp, scale=0.5)
    assert cli("register", temp, str(source)).returncode == 0
    listed = cli("list", "--after", temp[:-1], "--limit", "1")  # the page of one that starts just before it
    assert listed.returncode == 0, listed.stderr
    assert [a["name"] for a in json.loads(listed.stdout)["data"]] == [temp]
    assert tokens(store.url, temp)  # it serves, as itself (no fallback header)
    assert cli("pin", temp).returncode == 0
    refused = cli("delete", temp)
    assert refused.returncode == 1 and "pinned" in refused.stderr
    assert cli("unpin", temp).returncode == 0
    unloaded = cli("unload", temp)
    assert unloaded.returncode == 0 and '"unloaded": true' in unloaded.stdout  # serving and pinning loaded it
    assert cli("delete", temp).returncode == 0
    missing = cli("show", temp)
    assert missing.returncode == 1 and "404" in missing.stderr
    assert generate(store.url, temp).status_code == 404
    assert temp not in registry(store.url)


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_invalid_uploads_are_refused_and_change_nothing(store: Store, kind: str) -> None:
    name = unique("target")
    register(store, name, "legal")
    before = registry(store.url)
    directory = broken_adapter(store.demo.adapters["code"], store.workdir / unique(f"broken-{kind}"), kind)
    response = upload(store.url, name, directory)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == BROKEN[kind][1], error
    assert registry(store.url) == before
    assert tokens(store.url, name) == tokens(store.url, "legal")  # still the version set before


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


def test_registry_changes_reach_the_next_request(store: Store) -> None:
    """A name the server has served comes from its in-memory catalog; each change reaches the very next request."""
    code, legal = tokens(store.url, "code"), tokens(store.url, "legal")
    name = unique("changing")
    v1 = register(store, name, "code", aliases=["stable"])["info"]["version"]
    assert tokens(store.url, name) == tokens(store.url, name) == code  # the second from memory
    v2 = register(store, name, "legal")["info"]["version"]
    assert tokens(store.url, name) == legal  # latest moved
    assert tokens(store.url, f"{name}@stable") == code
    response = httpx.put(f"{store.url}/v1/adapters/{name}/aliases/stable", json={"version": v2})
    assert response.status_code == 200, response.text
    assert tokens(store.url, f"{name}@stable") == legal
    response = httpx.delete(f"{store.url}/v1/adapters/{name}@{v1}")
    assert response.status_code == 200, response.text
    assert tokens(store.url, name) == legal
    response = generate(store.url, f"{name}@{v1[:12]}")
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found", response.text


def test_nan_adapter_fails_its_health_check_and_falls_back(store: Store) -> None:
    broken = unique("broken")
    fallbacks = f'loraserve_adapter_fallbacks_total{{adapter="{broken}",reason="health_check_failed"}}'
    response = upload(store.url, broken, nan_adapter(store.demo.adapters["medical"], store.workdir / broken))
    assert response.status_code == 201, response.text
    health = httpx.get(f"{store.url}/v1/adapters/{broken}/health").json()
    assert health["state"] == "failed" and "non-finite" in health["reason"], health
    before = metric(store.url, fallbacks)
    response = generate(store.url, broken)
    assert response.status_code == 200, response.text
    assert response.headers["X-Adapter-Fallback"] == "base"
    assert response.headers["X-Adapter-Fallback-Reason"] == "health_check_failed"
    assert response.json()["choices"][0]["text"] == tokens(store.url, BASE)
    assert metric(store.url, fallbacks) == before + 1


def test_health_check_is_servings_probe_it_heals_a_copy_and_fails_without_an_intact_one(store: Store) -> None:
    """POST /v1/adapters/{ref}/health runs serving's own probe (lease the files, load, generate)."""
    name = unique("probed")
    digest = register(store, name, "code", scale=0.8)["info"]["version"]
    check = f"{store.url}/v1/adapters/{name}/health"
    cached = store.workdir / "store" / "cache" / digest / WEIGHTS
    cached.write_bytes(cached.read_bytes()[:-64])  # disk corruption after registration: healed from the source
    healed = httpx.post(check, timeout=120)
    assert healed.status_code == 200, healed.text
    assert healed.json()["state"] == "ok" and healed.json()["reason"] is None
    answer = tokens(store.url, name)
    cached.write_bytes(cached.read_bytes()[:-64])
    source = store.volume / name / WEIGHTS
    source.write_bytes(source.read_bytes()[:-64])  # ...and the source changed too: nothing intact is left
    failed = httpx.post(check, timeout=120)
    assert failed.status_code == 200, failed.text
    assert failed.json()["state"] == "failed" and failed.json()["reason"].startswith("InvalidAdapter"), failed.json()
    assert failed.json()["checked_at"] > healed.json()["checked_at"]
    assert httpx.get(check).json() == failed.json()
    response = generate(store.url, name)
    assert response.status_code == 200 and response.headers["X-Adapter-Fallback"] == "base", response.headers
    assert response.json()["choices"][0]["text"] == tokens(store.url, BASE) != answer


def test_corrupt_adapter_under_load_falls_back_to_base(store: Store) -> None:
    fragile = unique("fragile")
    digest = register(store, fragile, "medical", scale=1.5)["info"]["version"]
    fallbacks = f'loraserve_adapter_fallbacks_total{{adapter="{fragile}",reason="checksum_mismatch"}}'
    corrupt = "loraserve_adapter_disk_cache_corrupt_total"
    good = {m: tokens(store.url, m) for m in ("code", "legal", "medical", BASE)}
    assert tokens(store.url, fragile) not in good.values()
    before = {series: metric(store.url, series) for series in (fallbacks, corrupt)}
    for weights in (store.workdir / "store" / "cache" / digest / WEIGHTS, store.volume / fragile / WEIGHTS):
        weights.write_bytes(weights.read_bytes()[:-100])  # the cached copy and the source: nothing intact is left

    async def burst() -> list[tuple[str, httpx.Response]]:
        models = [*good] * 3 + [fragile] * 4
        async with httpx.AsyncClient(timeout=300) as client:
            body = {"prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}
            calls = [client.post(f"{store.url}/v1/completions", json={**body, "model": m}) for m in models]
            return list(zip(models, await asyncio.gather(*calls), strict=True))

    for model, response in asyncio.run(burst()):
        assert response.status_code == 200, (model, response.text)
        text = response.json()["choices"][0]["text"]
        if model == fragile:
            assert response.headers["X-Adapter-Fallback"] == "base"
            assert response.headers["X-Adapter-Fallback-Reason"] == "checksum_mismatch"
            assert text == good[BASE]
        else:
            assert "X-Adapter-Fallback" not in response.headers and text == good[model]
    assert metric(store.url, fallbacks) - before[fallbacks] == 4
    assert metric(store.url, corrupt) - before[corrupt] == 1


def test_a_sigterm_lets_streams_finish_and_everything_survives_the_restart(store: Store) -> None:
    """The restart is a pod told to stop: SIGTERM with a stream in flight (``tests/e2e/faults.py``: the stream
    completes, new connections are refused, orderly exit), then a new server on the same store."""
    kept = unique("kept")
    register(store, kept, "code", aliases=["stable"])
    response = upload(store.url, kept, copy_adapter(store.demo.adapters["legal"], store.workdir / unique("up")))
    assert response.status_code == 201, response.text
    broken = unique("broken")
    response = upload(store.url, broken, nan_adapter(store.demo.adapters["medical"], store.workdir / broken))
    assert response.status_code == 201, response.text
    before = registry(store.url)
    assert {kept, broken, "code"} <= set(before)
    expected = {m: tokens(store.url, m) for m in (kept, f"{kept}@stable")}
    assert expected[kept] != expected[f"{kept}@stable"]
    sigterm_during_a_stream(store.server, "code")
    store.server = start_server(store.server.config, store.workdir)
    assert registry(store.url) == before
    assert {m: tokens(store.url, m) for m in expected} == expected
    health = httpx.get(f"{store.url}/v1/adapters/{broken}/health").json()
    assert health["state"] == "failed" and "non-finite" in health["reason"], health
