"""``AdapterSelector``: who may use which adapter, on-demand claims, and the fallback policy.

A real ``AdapterStore`` (real files, real SQLite: each test's own copy of one store) and a
stand-in engine (``ensure_loaded`` and ``ready``, refusing the names it is
told to), so each decision is checked in milliseconds; the same paths through
a real engine and HTTP are in tests/e2e/test_security_tenants.py and
tests/e2e/test_adapter_store.py.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from adapter_store import AdapterStore, RegistryUnavailable, ServedAdapter
from adapter_store.changes import SqliteChanges
from serving.api.auth import OPEN_PRINCIPAL, Principal
from serving.api.errors import AdapterUnavailableError, ModelNotFoundError, RegistryUnavailableError
from serving.api.selector import FALLBACK_HEADER, FALLBACK_REASON_HEADER, AdapterSelector
from serving.config import load_settings
from serving.engine import AdapterLoadFailed
from serving.metrics import BASE_LABEL, UNKNOWN_LABEL, AdapterMetrics
from serving.store import open_store
from tests.adapter_store.helpers import BASE_NAME, copy_back, set_aside, write_adapter
from tests.serving.test_store import write_config

ADMIN = Principal(key_id="ops", tenant=None, role="admin")
HOSPITAL = Principal(key_id="h", tenant="hospital", role="user")
LAWFIRM = Principal(key_id="l", tenant="lawfirm", role="user")
NOBODY = Principal(key_id="n", tenant=None, role="user")  # a user key without a tenant
OWNERS = {"public": None, "medical": "hospital", "legal": "lawfirm"}


@dataclass
class FakeEngine:
    """What the selector uses of ``LoraEngine``: ``ensure_loaded`` (refusing ``refuse``) and ``ready``."""

    refuse: set[str] = field(default_factory=set)
    ready: bool = True
    loaded: list[str] = field(default_factory=list)

    async def ensure_loaded(self, adapter: ServedAdapter) -> None:
        if adapter.name in self.refuse:
            raise AdapterLoadFailed(f"Call to add_lora method failed: {adapter.name} has a bad shape")
        self.loaded.append(adapter.name)


@dataclass
class World:
    store: AdapterStore
    selector: AdapterSelector
    engine: FakeEngine
    metrics: AdapterMetrics
    volume: Path


def store_settings(**section: object) -> pytest.MarkDecorator:
    """The ``world`` of a test with these ``store`` settings (e.g. ``fallback``, ``on_demand``)."""
    return pytest.mark.parametrize("world", [section], indirect=True, ids=[f"store={section}"])


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three registered adapters (public, hospital's, lawfirm's) and ``fresh`` in a source, not registered, in a
    closed store: every ``world`` of this module starts from a copy (~12 ms of CPU less a test, a quarter of the module's)."""
    root = tmp_path_factory.mktemp("selector") / "world"
    volume = root / "volume"
    for i, name in enumerate([*OWNERS, "fresh"]):
        write_adapter(volume / name, seed=i + 1)
    settings = load_settings(write_config(root, _section({}), []))
    store = open_store(settings, root / "unused")
    for name, owner in OWNERS.items():
        store.register(str(volume / name), name, tenant=owner)
    store.close()
    return set_aside(root)


def _section(settings: dict) -> dict:
    return {"root": "store", "sources": [{"type": "local", "roots": ["volume"]}], **settings}


@pytest.fixture
def world(registered: Path, request: pytest.FixtureRequest) -> Iterator[World]:
    """A copy of the ``registered`` store, opened with the test's ``store`` settings (``store_settings``)."""
    with copy_back(registered) as root:
        settings = load_settings(write_config(root, _section(getattr(request, "param", {})), []))
        store = open_store(settings, root / "unused")
        metrics, engine = AdapterMetrics(CollectorRegistry()), FakeEngine()
        selector = AdapterSelector(settings, store, metrics, engine)  # type: ignore[arg-type]
        try:
            yield World(store, selector, engine, metrics, root / "volume")
        finally:
            store.close()


def counter(metric, *labels: str) -> float:
    return metric.labels(*labels)._value.get()


# -- who may use what ---------------------------------------------------------------------------------

ACCESS = [  # (caller, model, the adapter it gets or None for the 404)
    (ADMIN, "medical", "medical"),
    (ADMIN, "legal", "legal"),
    (HOSPITAL, "medical", "medical"),
    (HOSPITAL, "public", "public"),
    (HOSPITAL, "legal", None),
    (LAWFIRM, "legal", "legal"),
    (LAWFIRM, "medical", None),
    (LAWFIRM, "medical@latest", None),  # a ref of another tenant's name: the same 404
    (NOBODY, "public", "public"),
    (NOBODY, "medical", None),
    (NOBODY, "no-such-adapter", None),
    (ADMIN, "bad name!", None),  # not even a valid ref: the 404, not a 400 that would tell names apart
]


def warm(world: World, model: str) -> None:
    """Read ``model``'s name into the store's catalog, as a request of its owner would: the hot path serves it next."""
    name = model.partition("@")[0]
    if name in OWNERS:
        world.store.entry(name)
        assert world.store.cached_entry(name) is not None


@pytest.mark.parametrize("warmed", [False, True], ids=["registry", "catalog"])
@pytest.mark.parametrize(("caller", "model", "served"), ACCESS)
async def test_owner_decides_who_is_served(
    world: World, caller: Principal, model: str, served: str | None, warmed: bool
) -> None:
    if warmed:
        warm(world, model)
    unknown_before = counter(world.metrics.errors, UNKNOWN_LABEL, ModelNotFoundError.code)
    if served is None:
        with pytest.raises(ModelNotFoundError) as info:
            await world.selector.acquire(model, caller)
        # Another tenant's adapter answers exactly like a name that does not exist, under the `unknown` label.
        assert info.value.message.startswith(f"The model {model!r} does not exist.")
        assert counter(world.metrics.errors, UNKNOWN_LABEL, ModelNotFoundError.code) == unknown_before + 1
        assert world.engine.loaded == []  # nothing was loaded (or fetched) for a caller who may not use it
        return
    resolution = await world.selector.acquire(model, caller)
    try:
        assert resolution.adapter is not None and resolution.adapter.name == served
        assert resolution.headers == {} and world.engine.loaded == [served]
    finally:
        world.selector.release(resolution)
    world.store.delete(served)  # not AdapterInUse: the request's lease ended with release


@pytest.mark.parametrize(
    ("caller", "visible"),
    [
        (ADMIN, [BASE_NAME, "legal", "medical", "public"]),
        (HOSPITAL, [BASE_NAME, "medical", "public"]),
        (LAWFIRM, [BASE_NAME, "legal", "public"]),
        (NOBODY, [BASE_NAME, "public"]),
    ],
)
def test_each_caller_sees_the_base_and_the_adapters_it_may_use(
    world: World, caller: Principal, visible: list[str]
) -> None:
    assert sorted(world.selector.visible(caller)) == sorted(visible)
    with pytest.raises(ModelNotFoundError) as info:
        world.selector.require("no-such-adapter", caller)
    assert info.value.message.endswith(
        f"Served models: {', '.join(world.selector.visible(caller))}. GET /v1/models lists them."
    )


async def test_the_base_model_needs_no_adapter(world: World) -> None:
    resolution = await world.selector.acquire(BASE_NAME, NOBODY)
    assert resolution.adapter is None and resolution.headers == {} and world.engine.loaded == []


@pytest.mark.parametrize("model", ["medical", "medical@latest"])
async def test_a_served_adapter_is_selected_again_without_a_thread_or_registry_read(
    world: World, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hot path: once a name has been served, the next request for it reads neither SQLite nor a thread."""
    world.selector.release(await world.selector.acquire(model, HOSPITAL))

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("the hot path left the event loop or read the registry")

    monkeypatch.setattr("serving.api.selector.asyncio.to_thread", refused)
    for blocking in ("version", "tenant", "health", "entry", "acquire"):
        monkeypatch.setattr(world.store, blocking, refused)
    resolution = await world.selector.acquire(model, HOSPITAL)
    assert resolution.adapter is not None and resolution.adapter.name == "medical"
    world.selector.release(resolution)


# -- on demand: whom an unknown name is registered for -------------------------------------------------


@store_settings(on_demand=True)
@pytest.mark.parametrize(
    ("caller", "owner"),
    [(HOSPITAL, "hospital"), (ADMIN, None), (OPEN_PRINCIPAL, None), (NOBODY, "not registered")],
)
async def test_on_demand_registers_for_the_callers_tenant_only(
    world: World, caller: Principal, owner: str | None
) -> None:
    if owner == "not registered":  # a key with neither tenant nor admin role never registers anything
        with pytest.raises(ModelNotFoundError):
            await world.selector.acquire("fresh", caller)
        assert "fresh" not in world.store.names()
        return
    resolution = await world.selector.acquire("fresh", caller)
    world.selector.release(resolution)
    assert resolution.adapter is not None and resolution.adapter.name == "fresh"
    assert world.store.tenant("fresh") == owner
    assert world.selector.may_use(LAWFIRM, "fresh") is (owner is None)  # the hospital's now: not the lawfirm's


@store_settings(on_demand=True)
async def test_a_name_another_tenant_registered_meanwhile_is_not_served(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner is read again after resolving: a racing on-demand registration may have given the name away."""
    real_version = world.store.version

    def lawfirm_wins_the_race(ref: str, *, register_for=None):  # between the owner lookup and the resolution
        world.store.register(str(world.volume / "fresh"), "fresh", tenant="lawfirm")
        return real_version(ref, register_for=register_for)

    monkeypatch.setattr(world.store, "version", lawfirm_wins_the_race)
    with pytest.raises(ModelNotFoundError):
        await world.selector.acquire("fresh", HOSPITAL)
    assert world.store.tenant("fresh") == "lawfirm" and world.engine.loaded == []


async def test_without_on_demand_an_unregistered_name_is_not_looked_up(world: World) -> None:
    with pytest.raises(ModelNotFoundError):
        await world.selector.acquire("fresh", ADMIN)
    assert "fresh" not in world.store.names()


# -- the fallback policy -------------------------------------------------------------------------------


def break_health(world: World) -> None:
    version = world.store.version("medical")
    world.store.record_health("medical", version.version, "failed", reason="InvalidAdapter: /secret/path is bad")


def break_files(world: World) -> None:
    """Both the cached copy and the source are gone: leasing the files fails (source_refused)."""
    version = world.store.version("medical")
    world.store._cache.remove(version.version)  # white-box: as if evicted
    shutil.rmtree(world.volume / "medical")


def break_engine(world: World) -> None:
    world.engine.refuse.add("medical")


BREAKS = [  # (how the adapter breaks, the reason code clients see)
    (break_health, "health_check_failed"),
    (break_files, "source_refused"),
    (break_engine, "engine_load_failed"),
]


@pytest.mark.parametrize(("breaks", "reason"), BREAKS)
@pytest.mark.parametrize(("caller", "sees_detail"), [(ADMIN, True), (HOSPITAL, False)])
async def test_policy_error_is_a_503_with_the_reason_and_detail_for_admins_only(
    world: World, breaks, reason: str, caller: Principal, sees_detail: bool
) -> None:
    breaks(world)
    before = counter(world.metrics.errors, "medical", AdapterUnavailableError.code)
    with pytest.raises(AdapterUnavailableError) as info:
        await world.selector.acquire("medical", caller)
    message = info.value.message
    assert message.startswith(f"The adapter 'medical' cannot be served ({reason})")
    assert "store.fallback) is 'error'" in message
    # The detail names paths, sources and validation messages: admins only.
    detail = {
        "health_check_failed": "/secret/path",
        "source_refused": str(world.volume),
        "engine_load_failed": "bad shape",
    }
    assert (detail[reason] in message) is sees_detail
    assert counter(world.metrics.errors, "medical", AdapterUnavailableError.code) == before + 1
    if reason == "engine_load_failed":  # the refusal is remembered: the next request does not retry the engine
        record = world.store.health("medical", world.store.version("medical").version)
        assert record.state == "failed" and record.reason.startswith("engine_load_failed: ")
    world.store.delete("medical")  # not AdapterInUse: the failed request left no lease behind


@store_settings(fallback="base")
@pytest.mark.parametrize("served_before", [False, True], ids=["cold", "served-before"])
@pytest.mark.parametrize(("breaks", "reason"), BREAKS)
async def test_policy_base_answers_with_the_base_model_and_says_so(
    world: World, breaks, reason: str, served_before: bool
) -> None:
    if served_before:  # the catalog holds it and its files are leased from memory: the break must still be seen
        world.selector.release(await world.selector.acquire("medical", HOSPITAL))
        assert world.store.cached_entry("medical") is not None
    breaks(world)
    before = counter(world.metrics.fallbacks, "medical", reason)
    resolution = await world.selector.acquire("medical", HOSPITAL)
    assert resolution.adapter is None
    assert resolution.headers == {FALLBACK_HEADER: BASE_LABEL, FALLBACK_REASON_HEADER: reason}
    assert counter(world.metrics.fallbacks, "medical", reason) == before + 1


@store_settings(fallback="public")
@pytest.mark.parametrize(("breaks", "reason"), BREAKS)
async def test_policy_adapter_answers_with_that_adapter(world: World, breaks, reason: str) -> None:
    breaks(world)
    resolution = await world.selector.acquire("medical", HOSPITAL)
    try:
        assert resolution.adapter is not None and resolution.adapter.name == "public"
        assert resolution.headers == {FALLBACK_HEADER: "public", FALLBACK_REASON_HEADER: reason}
    finally:
        world.selector.release(resolution)
    world.store.delete("public")  # the fallback's lease ended too


@store_settings(fallback="legal")
async def test_a_fallback_the_caller_may_not_use_is_a_503_not_another_tenants_adapter(world: World) -> None:
    break_health(world)
    with pytest.raises(AdapterUnavailableError, match=r"Neither can its fallback 'legal' \(store.fallback\)"):
        await world.selector.acquire("medical", HOSPITAL)
    resolution = await world.selector.acquire("medical", ADMIN)  # an admin may use the lawfirm's adapter
    world.selector.release(resolution)
    assert resolution.adapter is not None and resolution.adapter.name == "legal"


@store_settings(fallback="base")
async def test_a_working_adapter_never_falls_back(world: World) -> None:
    resolution = await world.selector.acquire("medical", HOSPITAL)
    world.selector.release(resolution)
    assert resolution.adapter is not None and resolution.adapter.name == "medical" and resolution.headers == {}


# -- a registry outage on the request path -------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "answer"),
    [("base", "the base model"), ("error", AdapterUnavailableError)],
    ids=["fallback=base", "fallback=error"],
)
async def test_a_health_record_lost_to_a_registry_outage_is_logged_not_the_answer(
    world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, policy: str, answer: object
) -> None:
    """The engine refuses an adapter and the registry is down when its health is recorded: the request still
    gets what the fallback policy says (not a registry 503), and the lost record is logged."""
    world.selector.policy = policy

    def registry_down(*args: object, **kwargs: object) -> None:
        raise RegistryUnavailable("The adapter registry cannot be reached.")

    break_engine(world)
    monkeypatch.setattr(world.store, "record_health", registry_down)
    if answer is AdapterUnavailableError:
        with pytest.raises(AdapterUnavailableError, match=r"cannot be served \(engine_load_failed\)"):
            await world.selector.acquire("medical", HOSPITAL)
    else:
        resolution = await world.selector.acquire("medical", HOSPITAL)
        assert resolution.adapter is None and resolution.reason == "engine_load_failed"
    assert [r.getMessage() for r in caplog.records if "not recorded" in r.getMessage()] == [
        f"health of medical@{world.store.version('medical').version[:16]} not recorded: "
        "The adapter registry cannot be reached."
    ]
    world.store.delete("medical")  # no lease left behind


class _RegistryDown:
    """Every registry call fails as an unreachable PostgreSQL does."""

    def __getattr__(self, name: str) -> object:
        def down(*args: object, **kwargs: object) -> None:
            raise RegistryUnavailable(f"the adapter registry database cannot be reached ({name})")

        return down


OUTAGE = [  # (caller, model, the adapter it gets or None for the registry 503)
    (HOSPITAL, "medical", "medical"),
    (HOSPITAL, "public@latest", "public"),
    (ADMIN, "legal", "legal"),
    (HOSPITAL, "legal", None),  # another tenant's name: refused exactly as an unknown one, never a 404
    (LAWFIRM, "medical@latest", None),
    (HOSPITAL, "no-such-adapter", None),
]


@pytest.mark.parametrize(("caller", "model", "served"), OUTAGE)
async def test_a_registry_outage_serves_every_listed_adapter_and_refuses_the_rest_alike(
    world: World, monkeypatch: pytest.MonkeyPatch, caller: Principal, model: str, served: str | None
) -> None:
    """The last listing (a fleet replica keeps it read) is what an outage serves, files fetched as usual."""
    world.store.entries()
    for name in OWNERS:  # not on this replica's disk: the lease fetches them from their source
        world.store._cache.remove(world.store.version(name).version)
    monkeypatch.setattr(SqliteChanges, "outage", 1)  # the feed knows: nothing waits for a connection attempt
    monkeypatch.setattr(world.store, "_registry", _RegistryDown())
    if served is None:
        with pytest.raises(RegistryUnavailableError) as refused:  # the API's 503 registry_unavailable
            await world.selector.acquire(model, caller)
        assert refused.value.message == world.store._catalog._unreachable("looked up").message
        assert refused.value.message.count("medical") == refused.value.message.count("legal") == 0
        return
    resolution = await world.selector.acquire(model, caller)
    try:
        assert resolution.adapter is not None and resolution.adapter.name == served
        assert (resolution.adapter.path / "adapter_config.json").is_file()
    finally:
        world.selector.release(resolution)


@store_settings(on_demand=True, fallback="base")
async def test_a_registry_outage_during_an_on_demand_lookup_is_a_registry_503_not_a_fallback(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nobody could tell whether the name exists: the base model must not answer for it."""

    def registry_down(*args: object, **kwargs: object) -> None:
        raise RegistryUnavailable("The adapter registry cannot be reached.")

    monkeypatch.setattr(world.store, "version", registry_down)
    before = counter(world.metrics.fallbacks, UNKNOWN_LABEL, "registry_unavailable")
    with pytest.raises(RegistryUnavailableError):  # the API's 503, not a 500
        await world.selector.acquire("fresh", HOSPITAL)
    assert counter(world.metrics.fallbacks, UNKNOWN_LABEL, "registry_unavailable") == before


@pytest.mark.parametrize(("caller", "allowed"), [(HOSPITAL, True), (LAWFIRM, False), (ADMIN, True)])
def test_access_to_a_name_the_catalog_holds_is_decided_without_the_registry(
    world: World, monkeypatch: pytest.MonkeyPatch, caller: Principal, allowed: bool
) -> None:
    """So routing to an adapter (``may_use``) keeps working through a registry outage."""
    warm(world, "medical")

    def registry_down(*args: object, **kwargs: object) -> None:
        raise RegistryUnavailable("The adapter registry cannot be reached.")

    monkeypatch.setattr(world.store, "tenant", registry_down)
    assert world.selector.may_use(caller, "medical") is allowed
