"""Tenant isolation of adapter names through the real server (issue #13, findings 4, 6 and 10).

The shared ``limited`` server (tests/e2e/conftest.py), with this module's
keys for two tenants (``alpha``, ``beta``), a user key without a tenant
(``plain``) and an admin, and a store that registers names found in its local
source on demand. Each test uses its own adapter names, so the tests do not
depend on each other's order.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import RunningServer
from tests.e2e.adapter_files import WEIGHTS, broken_adapter, copy_adapter
from tests.e2e.conftest import keys_of

pytestmark = pytest.mark.engine

KEYS = keys_of("tenants")


@pytest.fixture
def server(limited: RunningServer) -> RunningServer:
    """The shared ``limited`` server, under the name these tests use."""
    return limited


def volume(server: RunningServer) -> Path:
    return Path(server.config["store"]["sources"][0]["roots"][0])


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[key]}"}


def complete(server: RunningServer, key: str, model: str) -> httpx.Response:
    body = {"model": model, "prompt": "The patient", "max_tokens": 2, "temperature": 0}
    return httpx.post(f"{server.url}/v1/completions", json=body, headers=auth(key), timeout=120)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def assert_like_unknown(server: RunningServer, key: str, response: httpx.Response, name: str) -> None:
    """``response`` (for ``name``) is exactly what ``key`` gets for a name that never existed."""
    never = f"never{uuid.uuid4().hex[:8]}"
    unknown = complete(server, key, never)
    assert response.status_code == unknown.status_code == 404, response.text
    assert response.json() == json.loads(unknown.text.replace(never, name))


def models(server: RunningServer, key: str) -> set[str]:
    response = httpx.get(f"{server.url}/v1/models", headers=auth(key))
    assert response.status_code == 200, response.text
    return {m["id"] for m in response.json()["data"]}


def show(server: RunningServer, name: str) -> dict:
    response = httpx.get(f"{server.url}/v1/adapters/{name}", headers=auth("admin"))
    assert response.status_code == 200, response.text
    return response.json()


def register(server: RunningServer, name: str, source: Path, **body) -> httpx.Response:
    body = {"name": name, "source": str(source), "check": False} | body
    return httpx.post(f"{server.url}/v1/adapters", json=body, headers=auth("admin"), timeout=300)


def upload(server: RunningServer, name: str, directory: Path, **form) -> httpx.Response:
    files = [("files", (p.name, p.read_bytes())) for p in sorted(directory.iterdir())]
    return httpx.post(
        f"{server.url}/v1/adapters/{name}/versions",
        files=files,
        data={"check": "false"} | form,
        headers=auth("admin"),
        timeout=300,
    )


def metrics(server: RunningServer) -> str:
    response = httpx.get(f"{server.url}/metrics", headers=auth("admin"))  # works with or without a /metrics role
    assert response.status_code == 200
    return response.text


def metric_value(text: str, name: str) -> float:
    match = re.search(rf"^{name}(?:_total)? ([0-9.e+]+)$", text, re.MULTILINE)
    assert match is not None, name
    return float(match[1])


def adapter_labels(text: str) -> set[str]:
    return set(re.findall(r'adapter="([^"]*)"', text))


# -- (1) on-demand registration belongs to the caller's tenant -------------------------------------------


def test_on_demand_name_becomes_the_callers_and_stays_hidden_from_others(server, demo_assets):
    copy_adapter(demo_assets.adapters["code"], volume(server) / "alphaod", scale=0.9)
    first = complete(server, "alpha", "alphaod")
    assert first.status_code == 200, first.text
    assert show(server, "alphaod")["tenant"] == "alpha"
    assert_like_unknown(server, "beta", complete(server, "beta", "alphaod"), "alphaod")
    assert "alphaod" in models(server, "alpha") and "alphaod" not in models(server, "beta")
    assert complete(server, "alpha", "alphaod").status_code == 200


def test_a_key_without_tenant_cannot_register_on_demand(server, demo_assets):
    copy_adapter(demo_assets.adapters["code"], volume(server) / "plainod", scale=0.7)
    assert_like_unknown(server, "plain", complete(server, "plain", "plainod"), "plainod")
    listed = httpx.get(f"{server.url}/v1/adapters", headers=auth("admin")).json()["data"]
    assert "plainod" not in {a["name"] for a in listed}
    assert complete(server, "admin", "plainod").status_code == 200  # an admin may (as public)
    assert show(server, "plainod")["tenant"] is None


# -- (2) ownership is set once: another tenant (or none) is refused, same files or new ------------------


def test_registering_or_uploading_an_owned_name_for_another_owner_is_409(server, demo_assets, tmp_path):
    source = copy_adapter(demo_assets.adapters["medical"], volume(server) / "ownedx", scale=1.1)
    created = register(server, "ownedx", source, tenant="alpha")
    assert created.status_code == 201, created.text
    other_files = copy_adapter(demo_assets.adapters["medical"], volume(server) / "ownedx2", scale=1.2)
    for tenant in ("beta", None):
        for files in (source, other_files):
            refused = register(server, "ownedx", files, tenant=tenant)
            assert refused.status_code == 409, refused.text
            assert error_of(refused)["code"] == "ownership_conflict" and error_of(refused)["param"] == "tenant"
            form = {} if tenant is None else {"tenant": tenant}
            refused = upload(server, "ownedx", files, **form)
            assert refused.status_code == 409 and error_of(refused)["code"] == "ownership_conflict", refused.text
    shown = show(server, "ownedx")
    assert shown["tenant"] == "alpha" and len(shown["versions"]) == 1
    assert_like_unknown(server, "beta", complete(server, "beta", "ownedx"), "ownedx")


# -- (3) a version uploaded without the tenant cannot make older versions public ------------------------


def test_new_versions_keep_the_names_owner(server, demo_assets, tmp_path):
    first = copy_adapter(demo_assets.adapters["legal"], volume(server) / "evolving")
    v1 = register(server, "evolving", first, tenant="alpha")
    assert v1.status_code == 201, v1.text
    newer = copy_adapter(demo_assets.adapters["legal"], tmp_path / "evolving2", scale=1.5)
    public = upload(server, "evolving", newer)  # no tenant: refused, nothing changes
    assert public.status_code == 409 and error_of(public)["code"] == "ownership_conflict", public.text
    v2 = upload(server, "evolving", newer, tenant="alpha")
    assert v2.status_code == 201, v2.text
    refs = [f"evolving@{v1.json()['info']['version']}", f"evolving@{v2.json()['info']['version']}", "evolving"]
    for ref in refs:
        assert complete(server, "alpha", ref).status_code == 200
        assert_like_unknown(server, "beta", complete(server, "beta", ref), ref)
        assert_like_unknown(server, "plain", complete(server, "plain", ref), ref)
    assert show(server, "evolving")["tenant"] == "alpha"


# -- (4) errors tell a caller nothing about paths, sources or other tenants ----------------------------


def test_a_broken_on_demand_adapter_answers_without_internals(server, demo_assets):
    broken = broken_adapter(demo_assets.adapters["code"], volume(server) / "brokenod", "pickle_weights")
    response = complete(server, "beta", "brokenod")
    assert response.status_code == 503, response.text
    error = error_of(response)
    assert error["code"] == "adapter_unavailable" and "'brokenod'" in error["message"]
    for secret in (str(volume(server)), str(broken), "file:", "adapter_model.bin", "pickle", "safetensors"):
        assert secret not in response.text.replace("pickle_weights", ""), secret
    assert str(broken) in server.log() or "brokenod" in server.log()  # the detail is in the log


def test_another_tenants_broken_adapter_is_a_plain_404_and_fetches_nothing(server, demo_assets):
    source = copy_adapter(demo_assets.adapters["legal"], volume(server) / "fragile", scale=1.3)
    created = register(server, "fragile", source, tenant="alpha")
    assert created.status_code == 201, created.text
    digest = created.json()["info"]["version"]
    cache_root = Path(server.config["store"]["root"]) / "cache"
    for weights in (cache_root / digest / WEIGHTS, source / WEIGHTS):
        weights.write_bytes(b"\0" * weights.stat().st_size)  # only a lease (checksum) would notice
    before = metrics(server)
    assert_like_unknown(server, "beta", complete(server, "beta", "fragile"), "fragile")
    between = metrics(server)
    corrupt = "loraserve_adapter_disk_cache_corrupt"
    assert metric_value(between, corrupt) == metric_value(before, corrupt)  # no lease, no fetch
    assert (cache_root / digest).is_dir()
    owner = complete(server, "alpha", "fragile")  # the owner's request does lease: the damage shows
    assert owner.status_code == 503 and error_of(owner)["code"] == "adapter_unavailable", owner.text
    assert metric_value(metrics(server), corrupt) == metric_value(between, corrupt) + 1
    assert str(source) not in owner.text and "file:" not in owner.text


# -- (5) metric labels never carry unregistered names ---------------------------------------------------


def test_unknown_and_unregistrable_names_add_no_label_values(server, demo_assets):
    broken = [f"bad{uuid.uuid4().hex[:10]}" for _ in range(10)]
    for name in broken:  # found in the source on demand, refused by validation: never registered
        broken_adapter(demo_assets.adapters["code"], volume(server) / name, "pickle_weights")
    before = adapter_labels(metrics(server))
    for name in broken:
        assert complete(server, "alpha", name).status_code == 503
    for i in range(40):
        name = f"rnd{uuid.uuid4().hex[:12]}"
        response = complete(server, ("alpha", "beta", "plain", "admin")[i % 4], name)
        assert response.status_code == 404
    after = adapter_labels(metrics(server))
    assert after - before <= {"unknown"}, sorted(after - before)


# -- (6) an adapter the engine refuses fails its request, never the engine ------------------------------


# -- (7) names are whole-string matches: a trailing newline is no name --------------------------------------


def test_a_source_directory_named_with_a_trailing_newline_is_never_registered(server, demo_assets):
    """``re.match`` with ``$`` accepts ``"name\\n"``: a tenant-written directory so named would become a name."""
    copy_adapter(demo_assets.adapters["code"], volume(server) / "tricky\n", scale=0.8)
    refused = complete(server, "alpha", "tricky\n")
    assert refused.status_code == 404 and error_of(refused)["code"] == "model_not_found", refused.text
    listed = httpx.get(f"{server.url}/v1/adapters", headers=auth("admin")).json()["data"]
    assert not any(a["name"].startswith("tricky") for a in listed)
