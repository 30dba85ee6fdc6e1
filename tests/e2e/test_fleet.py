"""A fleet on one machine: two real replicas sharing one PostgreSQL registry and one S3 API (moto).

Each replica is ``loraserve serve`` with its own port, engine and local disk
cache, nothing in front of them; they share only ``store.registry`` (a real
PostgreSQL 15 cluster, password from ``PGPASSWORD`` as a Kubernetes Secret
would give it) and ``store.uploads`` (a bucket on a real S3 API). What the
README's "Running a fleet" promises is checked here:

- a version uploaded through replica A, or registered through it from the
  bucket (a source), is served by replica B within 1 s;
- an alias flipped under load on both replicas fails no request, and no
  request that starts more than 1 s after the flip was acknowledged gets the
  old version, on either replica, while each serves the new one (each answer
  is identified by its greedy text, which differs between the two versions'
  files);
- replica B started on an empty disk (a new pod) after uploads through A
  still has everything: the uploads' only copies are objects in the bucket
  (files, then a completion marker), and a version deleted through B leaves
  none behind (B starts at its first use, so this check, the module's first,
  is B's first start; run after B served, it restarts B on a wiped disk);
- with PostgreSQL stopped, adapters both replicas know keep being served,
  even one that B was never asked for and whose files it never held (it is in
  the listing B keeps read, and its files are in the bucket); ``/v1/models``
  answers from that listing; admin calls and names nobody knows get a 503
  ``registry_unavailable``; everything recovers once the database is back;
- a pin through replica A is seen by replica B within 1 s, and B then holds
  the version in its engine (tier ``slot`` or ``host`` of
  ``loraserve_adapter_loaded`` on B's /metrics: a load, so no fixed bound);
  an unload or a delete through A has B drop it within 1 s (engine
  events on ``loraserve_engine``); an unpin through A is seen by B within 1 s
  and leaves the version loaded there (released, not unloaded).

The measured delays are printed (run with ``-s``) for the README.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import boto3
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapter_store.store import KEEP_LISTING_S
from checkpoints.assets import DemoAssets
from tests.conftest import RunningServer, demo_config, retire_server, start_server, stop_server
from tests.e2e.adapter_files import copy_adapter
from tests.postgres import PASSWORD, PostgresCluster

pytestmark = pytest.mark.engine

PROMPT = "Please explain how it works"
TOKENS = 8
BUCKET = "fleet"
PROPAGATION_BOUND_S = 1.0
# After an outage a replica sees changes again once its listener has reconnected (backoff capped at 1 s).
RECOVERY_BOUND_S = 3.0
OUTAGE_S = 4.0
ENGINE_TIERS = {"slot", "host"}  # loraserve_adapter_loaded tiers in the engine (the third, disk, is the store's)


@dataclass
class Fleet:
    a: RunningServer
    b_config: dict
    workdir: Path
    demo: DemoAssets
    postgres: PostgresCluster
    env: dict[str, str]
    s3: str  # the S3 API's endpoint
    started_b: RunningServer | None = None
    starting_b: threading.Lock = field(default_factory=threading.Lock)

    @property
    def b(self) -> RunningServer:
        """Replica B, started at its first use (a test's requests from several threads start it once)."""
        with self.starting_b:
            if self.started_b is None:
                self.started_b = start_server(self.b_config, Path(self.b_config["store"]["root"]).parent, self.env)
            return self.started_b

    def objects(self, digest: str) -> set[str]:
        """The bucket's keys of one upload: its files under ``uploads/<digest>/`` and its completion marker."""
        listed = boto3.client("s3", endpoint_url=self.s3).list_objects_v2(Bucket=BUCKET, Prefix=f"uploads/{digest}")
        return {o["Key"].removeprefix(f"uploads/{digest}") for o in listed.get("Contents", [])}

    def b_on_an_empty_disk(self) -> RunningServer:
        """B as a rescheduled pod has it: started now on its empty store root, or, had it started, stopped, its
        store root wiped and started again. A first start is that start less a stop (an engine start fewer)."""
        with self.starting_b:
            if self.started_b is not None:
                stop_server(self.started_b)
                shutil.rmtree(Path(self.b_config["store"]["root"]))
                self.started_b = None
        return self.b


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}@{parts.hostname}:{parts.port}"))


def _replica_config(demo: DemoAssets, workdir: Path, registry: str, s3: str) -> dict:
    config = demo_config(demo)
    config["routing"] = None  # not under test: no prompt-router encoder to load at each start
    config["store"] = {
        "root": str(workdir / "store"),
        "registry": registry,
        "uploads": {"type": "s3", "url_prefix": f"s3://{BUCKET}/uploads/", "endpoint_url": s3},
        "sources": [{"type": "s3", "url_prefixes": [f"s3://{BUCKET}/sources/"], "endpoint_url": s3}],
        "fallback": "error",
        # The safety-net re-read out of the way: within a second, only LISTEN/NOTIFY can carry a change.
        "refresh_s": 60,
    }
    return config


@pytest.fixture(scope="module")
def fleet(demo_assets, postgres: PostgresCluster, s3_server: str, tmp_path_factory) -> Iterator[Fleet]:
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=BUCKET)
    registry = _without_password(postgres.database())
    env = {"PGPASSWORD": PASSWORD}
    workdir = tmp_path_factory.mktemp("fleet")
    configs = {r: _replica_config(demo_assets, workdir / r, registry, s3_server) for r in ("a", "b")}
    for replica in configs:
        (workdir / replica).mkdir()
    # B starts at its first use: replicas opening an empty database together are tests/adapter_store's
    # (test_registry_fleet.py), and a start here would be restarted by the empty-disk check.
    state = Fleet(
        start_server(configs["a"], workdir / "a", env), configs["b"], workdir, demo_assets, postgres, env, s3_server
    )
    yield state
    retire_server(state.a)
    if state.started_b is not None:
        retire_server(state.started_b)


def generate(url: str, model: str) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def text(url: str, model: str) -> str:
    response = generate(url, model)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def upload(fleet: Fleet, url: str, name: str, domain: str, scale: float | None = None) -> str:
    """Upload a copy of a demo adapter's files as a version of ``name``; its version id.

    Uploads are content-addressed: the same files under several names are one upload. ``scale``
    (lora_B rescaled) gives files, a digest and outputs of their own."""
    directory = copy_adapter(fleet.demo.adapters[domain], fleet.workdir / unique("files"), scale=scale)
    files = [("files", (p.name, p.read_bytes())) for p in sorted(directory.iterdir())]
    response = httpx.post(f"{url}/v1/adapters/{name}/versions", files=files, timeout=300)
    assert response.status_code == 201, response.text
    return response.json()["info"]["version"]


def register(fleet: Fleet, url: str, name: str, domain: str, scale: float) -> str:
    """Put a copy of a demo adapter's files in the bucket and register them from there as a version of ``name``."""
    directory = copy_adapter(fleet.demo.adapters[domain], fleet.workdir / unique("files"), scale=scale)
    prefix = f"sources/{directory.name}/"
    s3 = boto3.client("s3", endpoint_url=fleet.s3)
    for path in directory.iterdir():
        s3.put_object(Bucket=BUCKET, Key=prefix + path.name, Body=path.read_bytes())
    body = {"name": name, "source": f"s3://{BUCKET}/{prefix}"}
    response = httpx.post(f"{url}/v1/adapters", json=body, timeout=300)
    assert response.status_code == 201, response.text
    return response.json()["info"]["version"]


def pinned(url: str, name: str, version: str) -> bool:
    response = httpx.get(f"{url}/v1/adapters/{name}", timeout=30)
    assert response.status_code == 200, response.text
    (view,) = (v for v in response.json()["versions"] if v["info"]["version"] == version)
    return view["pinned"]


def set_alias(url: str, name: str, alias: str, version: str) -> httpx.Response:
    return httpx.put(f"{url}/v1/adapters/{name}/aliases/{alias}", json={"version": version}, timeout=30)


def wait_for(url: str, model: str, expected: str, since: float, bound_s: float = PROPAGATION_BOUND_S) -> float:
    """Seconds from ``since`` until a request that *started* then got ``expected``; fails past ``bound_s``."""
    while True:
        started = time.monotonic()
        if text(url, model) == expected:
            return started - since
        assert started - since < bound_s, f"{model} on {url} still old {started - since:.2f}s later"
        time.sleep(0.02)


def adapters(url: str) -> dict[str, tuple[dict, list[str]]]:
    response = httpx.get(f"{url}/v1/adapters", timeout=30)
    assert response.status_code == 200, response.text
    return {a["name"]: (a["aliases"], [v["id"] for v in a["versions"]]) for a in response.json()["data"]}


def test_a_replica_started_on_an_empty_disk_has_everything(fleet: Fleet) -> None:
    """The module's first test: B's first start (later: a restart on a wiped disk)."""
    name = unique("kept")
    first = upload(fleet, fleet.a.url, name, "code")
    second = upload(fleet, fleet.a.url, name, "medical", scale=1.001)  # files no other version shares
    assert set_alias(fleet.a.url, name, "stable", first).status_code == 200
    expected = {m: text(fleet.a.url, m) for m in (name, f"{name}@stable")}
    assert expected[name] != expected[f"{name}@stable"]
    assert fleet.objects(second) == {"/adapter_config.json", "/adapter_model.safetensors", ".complete"}
    before = adapters(fleet.a.url)
    b = fleet.b_on_an_empty_disk()  # the uploads' only copies are in the bucket
    assert adapters(b.url) == before
    assert {m: text(fleet.b.url, m) for m in expected} == expected
    response = httpx.delete(f"{fleet.b.url}/v1/adapters/{name}@{second}", timeout=60)
    assert response.status_code == 200, response.text
    assert fleet.objects(second) == set()  # its last version gone, the upload goes too


def test_a_registration_and_an_upload_through_one_replica_are_served_by_the_other_within_a_second(
    fleet: Fleet,
) -> None:
    code, legal = text(fleet.a.url, "code"), text(fleet.a.url, "legal")
    assert code != legal
    name = unique("shared")
    upload(fleet, fleet.a.url, name, "code")
    assert text(fleet.b.url, name) == code  # B knows the name now (its catalog holds it)
    upload(fleet, fleet.a.url, name, "legal")
    delay = wait_for(fleet.b.url, name, legal, since=time.monotonic())
    print(f"\nfleet: B's first request started {delay * 1000:.0f} ms after A acknowledged the upload got it")
    registered = register(fleet, fleet.a.url, name, "code", scale=1.003)  # files of its own, from the bucket
    acknowledged = time.monotonic()
    reference = text(fleet.a.url, f"{name}@{registered}")  # this version's own greedy text
    assert reference != legal  # what B served until now
    delay = wait_for(fleet.b.url, name, reference, since=acknowledged)
    print(f"fleet: B's first request started {delay * 1000:.0f} ms after A acknowledged a registration got it")


def test_an_alias_flip_under_load_fails_nothing_and_serves_the_new_version_within_a_second(fleet: Fleet) -> None:
    code, legal = text(fleet.a.url, "code"), text(fleet.a.url, "legal")
    name = unique("flip")
    old = upload(fleet, fleet.a.url, name, "code")
    new = upload(fleet, fleet.a.url, name, "legal")
    assert set_alias(fleet.a.url, name, "stable", old).status_code == 200
    model = f"{name}@stable"
    for url in (fleet.a.url, fleet.b.url):
        assert text(url, model) == code
    answers: list[tuple[str, float, int, str]] = []  # (replica, start, status, text)
    flipped: list[float] = []

    async def client(http: httpx.AsyncClient, url: str, until: float) -> None:
        body = {"model": model, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}
        while time.monotonic() < until:
            start = time.monotonic()
            response = await http.post(f"{url}/v1/completions", json=body)
            ok = response.status_code == 200
            answers.append(
                (url, start, response.status_code, response.json()["choices"][0]["text"] if ok else response.text)
            )

    async def flip(http: httpx.AsyncClient) -> None:
        await asyncio.sleep(2.0)
        response = await http.put(f"{fleet.b.url}/v1/adapters/{name}/aliases/stable", json={"version": new})
        assert response.status_code == 200, response.text
        flipped.append(time.monotonic())

    async def run() -> None:
        until = time.monotonic() + 6.0
        async with httpx.AsyncClient(timeout=120) as http:
            clients = [client(http, url, until) for url in (fleet.a.url, fleet.b.url) for _ in range(4)]
            await asyncio.gather(flip(http), *clients)

    asyncio.run(run())
    assert [a for a in answers if a[2] != 200] == []
    assert {a[3] for a in answers} <= {code, legal}, "an answer matched neither version"
    (acknowledged,) = flipped
    late_old = [start - acknowledged for _, start, _, answer in answers if answer == code and start > acknowledged]
    assert all(delay <= PROPAGATION_BOUND_S for delay in late_old), late_old
    for replica in (fleet.a.url, fleet.b.url):  # each replica served both versions, the new one past the bound
        served = {
            (answer, start > acknowledged + PROPAGATION_BOUND_S) for url, start, _, answer in answers if url == replica
        }
        assert {(code, False), (legal, True)} <= served, (replica, served)
    print(
        f"\nfleet: alias flip under load: {len(answers)} requests, 0 failed; {len(late_old)} started after the "
        f"acknowledgement got the old version (the latest {max(late_old, default=0.0) * 1000:.0f} ms after it)"
    )


def test_serving_survives_a_registry_outage_and_admin_calls_recover(fleet: Fleet) -> None:
    name = unique("outage")
    old = upload(fleet, fleet.a.url, name, "code")
    new = upload(fleet, fleet.a.url, name, "legal")
    assert set_alias(fleet.a.url, name, "stable", old).status_code == 200
    known = {(url, m): text(url, m) for url in (fleet.a.url, fleet.b.url) for m in ("code", name, f"{name}@stable")}
    # Registered through A, and files no other version has: B has never been asked for it, nor holds them.
    cold = unique("cold")
    upload(fleet, fleet.a.url, cold, "medical", scale=1.002)
    cold_text = text(fleet.a.url, cold)
    time.sleep(2 * KEEP_LISTING_S)  # B's listing keeper reads it in the meantime (nothing asks B about it)
    fleet.postgres.stop()
    try:
        down = time.monotonic()
        assert text(fleet.b.url, cold) == cold_text  # from B's last listing, its files fetched from the bucket
        while time.monotonic() - down < OUTAGE_S:
            for (url, model), answer in known.items():
                assert text(url, model) == answer, (url, model)
        listed = httpx.get(f"{fleet.b.url}/v1/models", timeout=30)  # the last listing, not a 503
        assert listed.status_code == 200, listed.text
        assert {name, cold, "code"} <= {card["id"] for card in listed.json()["data"]}
        for response in (set_alias(fleet.a.url, name, "stable", new), generate(fleet.b.url, unique("unknown"))):
            assert response.status_code == 503, response.text  # a clear retry-later, never a 500
            error = response.json()["error"]
            assert error["code"] == "registry_unavailable" and error["type"] == "ServiceUnavailableError", error
    finally:
        fleet.postgres.start()
    back = time.monotonic()
    while (response := set_alias(fleet.a.url, name, "stable", new)).status_code != 200:
        assert response.status_code == 503 and time.monotonic() - back < 30, response.text
        time.sleep(0.2)
    delay = wait_for(fleet.b.url, f"{name}@stable", known[(fleet.b.url, name)], time.monotonic(), RECOVERY_BOUND_S)
    print(f"\nfleet: after the outage, an alias flip through A reached B in {delay * 1000:.0f} ms")


def engine_tiers(url: str, name: str, version: str) -> set[str]:
    """The engine tiers in which the replica at ``url`` holds ``name@version``, per its /metrics."""
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    (family,) = (f for f in text_string_to_metric_families(response.text) if f.name == "loraserve_adapter_loaded")
    held = {s.labels["tier"] for s in family.samples if (s.labels["adapter"], s.labels["version"]) == (name, version)}
    return held & ENGINE_TIERS


def until(condition: Callable[[], bool], since: float, bound_s: float, what: str) -> float:
    """Seconds from ``since`` until a check of ``condition`` that *started* then held; fails past ``bound_s``."""
    while True:
        started = time.monotonic()
        if condition():
            return started - since
        assert started - since < bound_s, f"{what}: not within {bound_s} s"
        time.sleep(0.02)


def test_a_pin_through_one_replica_takes_effect_on_the_other_within_a_second_and_is_preloaded(fleet: Fleet) -> None:
    name = unique("pinned")
    version = upload(fleet, fleet.a.url, name, "code")
    assert engine_tiers(fleet.b.url, name, version) == set()  # B has never served it
    response = httpx.put(f"{fleet.a.url}/v1/adapters/{name}@{version}/pin", timeout=60)
    acknowledged = time.monotonic()
    assert response.status_code == 200 and response.json()["pinned"], response.text
    try:
        # The pin takes effect on B within the bound (B's view of the registry); B's preload then reads the files
        # from the bucket and loads them, which takes what a load takes on a busy machine: no fixed bound there.
        pinned_on_b = until(lambda: pinned(fleet.b.url, name, version), acknowledged, PROPAGATION_BOUND_S, "pin on B")
        loaded = until(lambda: bool(engine_tiers(fleet.b.url, name, version)), acknowledged, 30.0, "B preloading")
        print(
            f"\nfleet: a pin through A was on B {pinned_on_b * 1000:.0f} ms and in B's engine {loaded * 1000:.0f} ms "
            "after A acknowledged it"
        )
    finally:
        assert httpx.delete(f"{fleet.a.url}/v1/adapters/{name}@{version}/pin", timeout=60).status_code == 200


def test_an_unpin_through_one_replica_releases_the_pin_everywhere_and_unloads_nothing(fleet: Fleet) -> None:
    name = unique("unpinned")
    version = upload(fleet, fleet.a.url, name, "code")
    assert httpx.put(f"{fleet.a.url}/v1/adapters/{name}@{version}/pin", timeout=60).status_code == 200
    until(lambda: bool(engine_tiers(fleet.b.url, name, version)), time.monotonic(), 10.0, "B preloading the pin")
    response = httpx.delete(f"{fleet.a.url}/v1/adapters/{name}@{version}/pin", timeout=60)
    acknowledged = time.monotonic()
    assert response.status_code == 200 and not response.json()["pinned"], response.text
    until(lambda: not pinned(fleet.b.url, name, version), acknowledged, PROPAGATION_BOUND_S, "unpin on B")
    time.sleep(PROPAGATION_BOUND_S)  # longer than any engine event takes to act on B
    assert engine_tiers(fleet.b.url, name, version), "an unpin must release the version, not unload it"


@pytest.mark.parametrize("action", ["unload", "delete"])
def test_an_unload_through_one_replica_drops_the_version_from_the_other_within_a_second(
    fleet: Fleet, action: str
) -> None:
    name = unique(action)
    version = upload(fleet, fleet.a.url, name, "code")
    text(fleet.b.url, name)  # B loads it to serve it
    until(lambda: bool(engine_tiers(fleet.b.url, name, version)), time.monotonic(), 10.0, "B loading it")
    if action == "unload":
        response = httpx.post(f"{fleet.a.url}/v1/adapters/{name}@{version}/unload", timeout=60)
    else:
        response = httpx.delete(f"{fleet.a.url}/v1/adapters/{name}@{version}", timeout=60)
    acknowledged = time.monotonic()
    assert response.status_code == 200, response.text
    delay = until(lambda: not engine_tiers(fleet.b.url, name, version), acknowledged, PROPAGATION_BOUND_S, action)
    print(f"\nfleet: a {action} through A left B's engine {delay * 1000:.0f} ms after A acknowledged it")
