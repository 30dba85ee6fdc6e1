"""``loraserve_adapter_loaded{adapter, version, tier}`` through the real server: what routers read to prefer a
replica that already holds an adapter, current within 1 s of a load, an eviction or a delete.

The module's server (the session's ``admin``, shared with
test_adapter_admin.py: tests/e2e/conftest.py) has one LoRA slot
(``max_loras: 1``) and room for two adapters in host memory
(``max_cpu_loras: 2``), so three adapters in a row
push the first from its slot, then out of host memory, and it is left on disk
only. Registering an adapter probes it through the engine, which loads it
like a request. Each test registers adapters of its own (copies of the demo ``code``
adapter under fresh names), so the configured adapters the start-up probes
loaded never decide an assertion, and the tests run in any order. Also here:
``name@alias`` and ``name@version`` requests are counted under the adapter's
name, in our per-adapter metrics and in vLLM's ``vllm:lora_requests_info``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.adapter_files import copy_adapter
from tests.e2e.conftest import AdminServer

pytestmark = pytest.mark.engine

FRESH_S = 1.0  # the gauge must follow the engine and the store within this
Series = tuple[str, str, str]  # (adapter, version, tier)


@dataclass
class Replica:
    host: AdminServer  # its server may have been restarted by test_adapter_admin.py: always ask it

    @property
    def url(self) -> str:
        return self.host.url

    @property
    def volume(self) -> Path:
        return self.host.volume

    @property
    def demo_code(self) -> Path:
        return self.host.demo.adapters["code"]

    def register(self, prefix: str, **extra) -> tuple[str, str]:
        """A copy of the demo ``code`` adapter under a fresh name; its (name, version digest)."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        source = copy_adapter(self.demo_code, self.volume / name)
        response = httpx.post(
            f"{self.url}/v1/adapters", json={"name": name, "source": str(source)} | extra, timeout=300
        )
        assert response.status_code == 201, response.text
        return name, response.json()["id"].split("@", 1)[1]


@pytest.fixture
def replica(admin: AdminServer) -> Replica:
    assert (admin.server.config["engine"]["max_loras"], admin.server.config["engine"]["max_cpu_loras"]) == (1, 2)
    return Replica(admin)


def families(url: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text)}


def loaded(url: str) -> set[Series]:
    family = families(url)["loraserve_adapter_loaded"]
    assert family.type == "gauge"
    assert all(s.value == 1 for s in family.samples), family.samples
    return {(s.labels["adapter"], s.labels["version"], s.labels["tier"]) for s in family.samples}


def tiers(seen: set[Series], name: str, version: str) -> set[str]:
    return {tier for adapter, v, tier in seen if (adapter, v) == (name, version)}


def expect(url: str, held: dict[tuple[str, str], set[str]]) -> None:
    """Within FRESH_S, each (name, version) of ``held`` is in exactly those tiers."""

    def holds(seen: set[Series]) -> bool:
        return all(tiers(seen, *key) == want for key, want in held.items())

    seen = within_fresh_s(url, holds)
    assert {key: tiers(seen, *key) for key in held} == held, seen


def within_fresh_s(url: str, holds: Callable[[set[Series]], bool]) -> set[Series]:
    """The gauge's series as soon as ``holds`` them, or as they were when FRESH_S ran out."""
    deadline = time.monotonic() + FRESH_S
    while True:
        seen = loaded(url)
        if holds(seen) or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


def complete(url: str, model: str) -> None:
    body = {"model": model, "prompt": "def", "max_tokens": 2, "temperature": 0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert "x-adapter-fallback" not in response.headers


def test_requests_move_versions_from_disk_to_slot_and_host_and_others_push_them_back(replica: Replica) -> None:
    (a, va), (b, vb), (c, vc) = (replica.register(p) for p in ("first", "second", "third"))
    # Registering probes each one through the engine, like a request: b's and c's probes pushed a out.
    expect(replica.url, {(a, va): {"disk"}, (b, vb): {"host", "disk"}, (c, vc): {"slot", "host", "disk"}})

    complete(replica.url, a)  # back in: the one slot and the host cache's older place (b's)
    expect(replica.url, {(a, va): {"slot", "host", "disk"}, (b, vb): {"disk"}, (c, vc): {"host", "disk"}})

    complete(replica.url, b)  # the slot goes to b, c leaves the host cache
    expect(replica.url, {(a, va): {"host", "disk"}, (b, vb): {"slot", "host", "disk"}, (c, vc): {"disk"}})


def test_delete_removes_the_version_from_every_tier(replica: Replica) -> None:
    name, version = replica.register("deleted")
    complete(replica.url, name)
    expect(replica.url, {(name, version): {"slot", "host", "disk"}})

    response = httpx.delete(f"{replica.url}/v1/adapters/{name}@{version}", timeout=60)
    assert response.status_code == 200, response.text
    expect(replica.url, {(name, version): set()})


def requests_counted(url: str, name: str) -> float:
    family = families(url)["loraserve_requests"]
    return sum(s.value for s in family.samples if s.name.endswith("_total") and s.labels["adapter"] == name)


def running_since(url: str, started: float) -> list[list[str]]:
    """The adapters each ``vllm:lora_requests_info`` sample written since ``started`` lists (running or
    waiting), asked again for a moment until there is one (vLLM writes it after the engine step)."""
    deadline = time.monotonic() + FRESH_S
    while True:
        samples = [s for s in families(url)["vllm:lora_requests_info"].samples if s.value >= started]
        named = [
            [
                a
                for a in s.labels["running_lora_adapters"].split(",") + s.labels["waiting_lora_adapters"].split(",")
                if a
            ]
            for s in samples
        ]
        named = [adapters for adapters in named if adapters]
        if named or time.monotonic() > deadline:
            return named
        time.sleep(0.05)


@pytest.mark.parametrize("suffix", ["@stable", "@{version}"])
def test_versioned_and_aliased_requests_count_under_the_adapter_name(replica: Replica, suffix: str) -> None:
    name, version = replica.register("counted", aliases=["stable"])
    model = name + suffix.format(version=version)
    before = requests_counted(replica.url, name)
    body = {"model": model, "prompt": "def", "max_tokens": 400, "ignore_eos": True, "stream": True}
    started = time.time()
    with httpx.stream("POST", f"{replica.url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert next(line for line in response.iter_lines() if line.startswith("data: "))  # first token is out
        named = running_since(replica.url, started)
    assert named and all(name in adapters for adapters in named), named  # vLLM counts it under the name
    assert requests_counted(replica.url, name) == before + 1
    assert f"{name}@" not in httpx.get(f"{replica.url}/metrics", timeout=10).text  # no label names the ref
