"""The facade: register from sources, resolve refs to versions and leased files, on-demand, delete, restart."""

from __future__ import annotations

import hashlib
import shutil
import threading
from pathlib import Path

import pytest

from adapter_store import (
    AdapterInUse,
    AdapterNotFound,
    AdapterPinned,
    Claim,
    InvalidAdapter,
    InvalidRef,
    LegacyDigest,
    OwnershipConflict,
    SourceError,
    content_digest,
)
from adapter_store.memory import (
    ADAPTER_OVERHEAD_BYTES,
    TENSOR_OVERHEAD_BYTES,
    cpu_loras_for_budget,
    max_adapter_bytes_in_memory,
)
from adapter_store.settings import StoreSettings
from adapter_store.store import NAME_LOCK_STRIPES, AdapterStore
from adapter_store.validation import BaseModelSpec
from tests.adapter_store.helpers import (
    BASE_NAME,
    BUCKET,
    lease,
    upload,
    write_adapter,
    write_base_config,
    write_v1_registry,
)


def open_store(tmp_path: Path, **overrides) -> AdapterStore:
    settings = StoreSettings.model_validate(
        {
            "root": tmp_path / "store",
            "sources": [{"type": "local", "roots": [tmp_path / "volume"]}],
            "max_adapter_bytes": 1 << 20,
            "disk_budget_bytes": 1 << 22,
            **overrides,
        }
    )
    spec = BaseModelSpec.from_config(write_base_config(tmp_path / "base"), [BASE_NAME])
    return AdapterStore.open(settings, base=spec, max_lora_rank=16)


def state(store: AdapterStore) -> tuple:
    names = store.names()
    return store.all_versions(), {n: store.aliases(n) for n in names}, sorted(store.disk_cache().cached)


def test_versions_aliases_and_old_versions_keep_their_files(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    src = tmp_path / "volume" / "code"
    v1 = store.register(str(write_adapter(src, seed=1)), "code", aliases=("stable",), tags={"owner": "a"})
    v2 = store.register(str(write_adapter(src, seed=2)), "code")  # same path, new weights: a new version
    assert v1.version != v2.version and v1.tags == {"owner": "a"}
    assert store.version("code") == v2 and store.version("code@stable") == v1
    with lease(store, f"code@{v1.version[:8]}") as old, lease(store, "code") as new:
        assert (old.version, new.version) == (v1.version, v2.version)
        assert content_digest(old.path) == v1.version and content_digest(new.path) == v2.version
    store.set_alias("code", "stable", v2.version)
    assert store.version("code@stable") == v2
    store.close()


def test_refs_resolve_to_versions_leased_files_and_owners(tmp_path: Path) -> None:
    """What serving's selector uses: a ref's version, its leased files, and the name's owner."""
    volume = tmp_path / "volume"
    store = open_store(tmp_path)
    v1 = store.register(str(write_adapter(volume / "code", seed=1)), "code", aliases=("stable",))
    v2 = store.register(str(write_adapter(volume / "code", seed=2)), "code")
    store.register(str(write_adapter(volume / "legal", seed=3)), "legal", tenant="lawfirm")
    store.register(str(write_adapter(volume / "medical", seed=4)), "medical", tenant="hospital")

    for ref, expected in [("code", v2), ("code@stable", v1), (f"code@{v1.version[:10]}", v1)]:
        version = store.version(ref)
        assert version == expected
        served = store.acquire(version)
        assert (served.name, served.version) == ("code", expected.version)
        assert content_digest(served.path) == expected.version and store._cache.in_use(expected.version)
        assert served.source == str(volume / "code") and served.size_bytes == expected.metadata.size_bytes
        store.release(served)
        assert not store._cache.in_use(expected.version)
    for missing, error in [
        ("nothing", AdapterNotFound),
        ("code@canary", AdapterNotFound),
        ("code@" + "0" * 8, AdapterNotFound),
        ("not a name", InvalidRef),
        ("base", AdapterNotFound),
    ]:
        with pytest.raises(error):
            store.version(missing)
    # Owners are the names' registered tenants (None: public); an unknown name is not found (never registered).
    assert [store.tenant(n) for n in ("code", "legal", "medical")] == [None, "lawfirm", "hospital"]
    with pytest.raises(AdapterNotFound):
        store.tenant("nothing")
    assert [(v.name, v.version) for v in store.latest()] == [
        ("code", v2.version),
        ("legal", store.version("legal").version),
        ("medical", store.version("medical").version),
    ]
    assert store.names() == ["code", "legal", "medical"]
    store.close()


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda d: write_adapter(d, rank=32), "rank_too_large"),
        (lambda d: write_adapter(d, base="other-model"), "wrong_base_model"),
        (lambda d: (write_adapter(d), (d / "adapter_model.pt").write_bytes(b"\x80\x04K\x01.")), "pickle_weights"),
    ],
)
def test_invalid_adapter_leaves_registry_and_cache_unchanged(tmp_path: Path, build, reason: str) -> None:
    store = open_store(tmp_path)
    store.register(str(write_adapter(tmp_path / "volume" / "good")), "code")
    before = state(store)
    build(tmp_path / "volume" / "bad")
    with pytest.raises(InvalidAdapter) as info:
        store.register(str(tmp_path / "volume" / "bad"), "code")
    assert info.value.reason == reason
    assert state(store) == before
    assert list((tmp_path / "store" / "staging").iterdir()) == []
    store.close()


def test_source_outside_roots_is_refused(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    with pytest.raises(SourceError, match="outside the configured local roots"):
        store.register(str(write_adapter(tmp_path / "elsewhere" / "x")), "x")
    assert store.all_versions() == []
    store.close()


@pytest.mark.parametrize(
    ("on_demand", "ref", "outcome"),
    [
        (True, "legal", "registered"),
        (True, "legal@stable", AdapterNotFound),  # only bare names are fetched on demand
        (True, "missing", AdapterNotFound),
        (False, "legal", AdapterNotFound),
    ],
)
def test_on_demand_resolution(tmp_path: Path, on_demand: bool, ref: str, outcome) -> None:
    write_adapter(tmp_path / "volume" / "legal", seed=7)
    store = open_store(tmp_path, on_demand=on_demand)
    if outcome == "registered":
        with lease(store, ref, register_for=Claim(None)) as adapter:
            assert content_digest(adapter.path) == content_digest(tmp_path / "volume" / "legal")
        assert store.version("legal").tags == {"registered_by": "on_demand"}
    else:
        with pytest.raises(outcome):
            store.version(ref, register_for=Claim(None))
        assert store.all_versions() == []
    store.close()


def test_on_demand_under_concurrent_requests_registers_once(tmp_path: Path) -> None:
    write_adapter(tmp_path / "volume" / "legal", seed=7)
    store = open_store(tmp_path, on_demand=True)
    seen: list[str] = []

    def request() -> None:
        with lease(store, "legal", register_for=Claim(None)) as adapter:
            seen.append(adapter.version)

    threads = [threading.Thread(target=request) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 8 and len(set(seen)) == 1
    assert len(store.versions("legal")) == 1
    store.close()


def test_on_demand_miss_racing_another_registration_still_resolves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request whose lookup misses just before another request registers the name gets that version."""
    write_adapter(tmp_path / "volume" / "legal", seed=7)
    store = open_store(tmp_path, on_demand=True)
    real_get = store._registry.get  # white-box: the miss races a registration between lookup and retry
    raced: list[str] = []

    def get_then_race(ref):
        try:
            return real_get(ref)
        except AdapterNotFound:
            if not raced:  # the other request finishes registering between this miss and the retry
                raced.append(store.register(str(tmp_path / "volume" / "legal"), "legal").version)
            raise

    monkeypatch.setattr(store._registry, "get", get_then_race)
    with lease(store, "legal", register_for=Claim(None)) as adapter:
        assert [adapter.version] == raced
    assert len(store.versions("legal")) == 1
    store.close()


def test_s3_version_is_fetched_again_after_eviction(tmp_path: Path, s3_server: str) -> None:
    adapters = [write_adapter(tmp_path / "src" / f"s{i}", seed=10 + i) for i in range(3)]
    for i, directory in enumerate(adapters):
        upload(s3_server, directory, f"store-test/s{i}/")
    size = max(sum(p.stat().st_size for p in d.iterdir()) for d in adapters)
    store = open_store(
        tmp_path,
        sources=[{"type": "s3", "url_prefixes": [f"s3://{BUCKET}/store-test/"], "endpoint_url": s3_server}],
        disk_budget_bytes=2 * size + 10,
        max_adapter_bytes=size + 10,
        on_demand=True,
    )
    versions = [
        store.version(f"s{i}", register_for=Claim(None)) for i in range(3)
    ]  # on demand, from S3; the first is evicted
    assert not store.is_cached(versions[0]) and store.disk_cache().stats.evictions == 1
    with lease(store, "s0") as adapter:  # fetched again from its source, checksum verified
        assert content_digest(adapter.path) == versions[0].version
    assert store.bytes_on_disk() <= 2 * size + 10
    store.close()


def test_delete_pins_and_leases(tmp_path: Path) -> None:
    store = open_store(tmp_path, pinned=[])
    v = store.register(str(write_adapter(tmp_path / "volume" / "code")), "code")
    with lease(store, "code"), pytest.raises(AdapterInUse, match="serving requests"):
        store.delete("code")
    store.pin("code")
    with pytest.raises(AdapterPinned, match="unpin it"):
        store.delete("code")
    store.pin("code", False)
    store.delete("code")
    assert store.all_versions() == [] and not store.is_cached(v)
    assert store.bytes_on_disk() == 0
    store.close()


def test_the_disk_is_measured_again_unless_a_measurement_young_enough_is_asked_for(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    assert store.bytes_on_disk() == 0
    store.register(str(write_adapter(tmp_path / "volume" / "code")), "code")  # fetched into the cache
    cached = store.bytes_on_disk()
    assert cached > 0
    store.delete("code")
    assert store.bytes_on_disk(max_age_s=3600) == cached  # the last walk's: young enough
    assert store.bytes_on_disk() == 0  # walked now
    assert store.bytes_on_disk(max_age_s=3600) == 0  # and that walk is the last one
    store.close()


def test_restart_keeps_everything_and_preloads_pinned(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    v = store.register(str(write_adapter(tmp_path / "volume" / "code")), "code", aliases=("stable",))
    store.record_health("code", v.version, "ok", latency_s=0.5)
    store.close()
    again = open_store(tmp_path, pinned=["code@stable"])
    assert again.version("code@stable") == v
    health = again.health("code", v.version)
    assert health.state == "ok" and health.latency_s == 0.5
    (preloaded,) = again.pin_configured()
    assert preloaded.version == v.version and again.version("code").pinned
    stats = again.disk_cache().stats
    assert stats.hits == 1 and stats.misses == 0  # still on disk from before
    again.close()


def test_memory_budget_to_cpu_loras(tmp_path: Path) -> None:
    spec = BaseModelSpec.from_config(write_base_config(tmp_path / "base"), [BASE_NAME])
    # 2 layers x rank 16 x (in + out) summed over q,k,v,o,gate,up,down of the tiny base, 2 bytes each
    data = 2 * 16 * (256 + 192 + 192 + 256 + 384 + 384 + 384) * 2
    # ... plus what its 28 tensors (A and B of 7 modules x 2 layers) and the adapter cost beside their data
    per = data + 28 * TENSOR_OVERHEAD_BYTES + ADAPTER_OVERHEAD_BYTES
    assert max_adapter_bytes_in_memory(spec, 16, "bfloat16") == per
    assert (
        cpu_loras_for_budget(10 * per + 1, base=spec, max_lora_rank=16, dtype="bfloat16", max_loras=4, slot_bytes=0)
        == 10
    )
    with pytest.raises(ValueError, match=f"holds 3 adapter\\(s\\).*raise the budget to at least {4 * per} bytes"):
        cpu_loras_for_budget(3 * per, base=spec, max_lora_rank=16, dtype="bfloat16", max_loras=4, slot_bytes=0)


def load_weights(path: Path) -> None:
    """A real probe: read every tensor, as an engine would when loading the adapter."""
    from safetensors.numpy import load_file

    assert load_file(str(path / "adapter_model.safetensors"))


def test_a_lease_heals_a_damaged_copy_and_is_refused_when_nothing_intact_is_left(tmp_path: Path) -> None:
    """The store's side of a health probe (serving's probe itself: tests/serving/api/adapters/test_probe.py)."""
    store = open_store(tmp_path)
    v = store.register(str(write_adapter(tmp_path / "volume" / "code")), "code")
    with lease(store, "code") as adapter:
        load_weights(adapter.path)
    weights = tmp_path / "store" / "cache" / v.version / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # disk corruption after registration: healed from the source
    with lease(store, "code") as adapter:
        load_weights(adapter.path)
    weights.write_bytes(weights.read_bytes()[:-64])
    write_adapter(tmp_path / "volume" / "code", seed=7)  # ...and the source changed too: nothing intact is left
    with pytest.raises(InvalidAdapter, match="the source changed after registration"), lease(store, "code"):
        pass
    store.delete("code")  # not AdapterInUse: the refused lease was released
    store.close()


def _upload(store: AdapterStore, files: Path, name: str, **kwargs):
    with store.staging() as staging:
        for file in files.iterdir():
            (staging / file.name).write_bytes(file.read_bytes())
        return store.register_upload(staging, name, **kwargs)


def test_upload_is_kept_as_its_source_until_deleted(tmp_path: Path) -> None:
    store = open_store(tmp_path, disk_budget_bytes=1 << 20)
    v = _upload(store, write_adapter(tmp_path / "elsewhere" / "up"), "up", tenant="acme")
    assert v.source == f"upload:{v.version}" and store.tenant("up") == "acme"
    store._cache.remove(v.version)  # white-box, as if evicted: the next lease fetches the kept upload
    with lease(store, "up") as adapter:
        assert content_digest(adapter.path) == v.version
    store.delete("up")
    assert list((tmp_path / "store" / "uploads").iterdir()) == [] and store.bytes_on_disk() == 0
    store.close()


def test_invalid_upload_keeps_nothing(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    with pytest.raises(InvalidAdapter) as info:
        _upload(store, write_adapter(tmp_path / "elsewhere" / "big", rank=32), "big")
    assert info.value.reason == "rank_too_large"
    assert store.all_versions() == [] and list((tmp_path / "store" / "uploads").iterdir()) == []
    assert store.bytes_on_disk() == 0 and list((tmp_path / "store" / "staging").iterdir()) == []
    store.close()


# -- ownership and on-demand claims ------------------------------------------------------------------


def test_register_and_upload_refuse_another_owner_before_fetching(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    files = write_adapter(tmp_path / "volume" / "medical", seed=1)
    v1 = store.register(str(files), "medical", tenant="hospital")
    for tenant in ("lawfirm", None):
        with pytest.raises(OwnershipConflict, match="belongs to tenant 'hospital'"):
            store.register(str(files), "medical", tenant=tenant)  # identical files
        with pytest.raises(OwnershipConflict):
            store.register(str(tmp_path / "volume" / "gone"), "medical", tenant=tenant)  # refused before fetching
        with pytest.raises(OwnershipConflict):
            _upload(store, write_adapter(tmp_path / "new" / str(tenant), seed=2), "medical", tenant=tenant)
    assert list((tmp_path / "store" / "uploads").iterdir()) == []  # nothing refused is kept
    v2 = _upload(store, write_adapter(tmp_path / "new" / "own", seed=3), "medical", tenant="hospital")
    assert store.tenant("medical") == "hospital" and [v.version for v in store.versions("medical")] == [
        v2.version,
        v1.version,
    ]
    with pytest.raises(InvalidRef, match="reserved"):
        store.register(str(files), "other", tags={"tenant": "hospital"})
    store.close()


@pytest.mark.parametrize(("claim", "owner"), [(Claim("hospital"), "hospital"), (Claim(None), None)])
def test_on_demand_registers_for_the_claimant_only(tmp_path: Path, claim: Claim, owner: str | None) -> None:
    write_adapter(tmp_path / "volume" / "legal", seed=7)
    store = open_store(tmp_path, on_demand=True)
    with pytest.raises(AdapterNotFound):  # no claim: nothing is looked up, nothing registered
        store.version("legal")
    assert store.all_versions() == []
    version = store.version("legal", register_for=claim)
    assert store.tenant("legal") == owner and version.tags == {"registered_by": "on_demand"}
    other = Claim("lawfirm")  # a later claimant gets the registered version back, owner unchanged (callers check)
    assert store.version("legal", register_for=other) == version and store.tenant("legal") == owner
    store.close()


def test_unknown_names_leave_no_lock_behind(tmp_path: Path) -> None:
    store = open_store(tmp_path, on_demand=True)
    locks = store._name_locks
    for i in range(1000):
        with pytest.raises(AdapterNotFound):
            store.version(f"unknown-{i}", register_for=Claim("t"))
    assert store._name_locks is locks and len(locks) == NAME_LOCK_STRIPES
    store.close()


# -- re-keying a registry of the old digest format ---------------------------------------------------


def old_digest(directory: Path) -> str:
    """The schema-1 digest, copied here: sha256 over sorted files of name + b"\\0" + bytes + b"\\0"."""
    h = hashlib.sha256()
    files = [p for p in directory.rglob("*") if p.is_file()]
    for file in sorted(files, key=lambda p: p.relative_to(directory).as_posix()):
        h.update(file.relative_to(directory).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return h.hexdigest()


def test_old_registry_is_rekeyed_from_cache_source_and_uploads(tmp_path: Path, caplog) -> None:
    root = tmp_path / "store"
    cached = write_adapter(tmp_path / "volume" / "cached", seed=1)  # also in cache/<old>
    fetched = write_adapter(tmp_path / "volume" / "fetched", seed=2)  # only in its source
    uploaded = write_adapter(tmp_path / "up", seed=3)  # an upload: uploads/<old>
    lost = write_adapter(tmp_path / "volume" / "lost", seed=4)  # source changed since: cannot be re-hashed
    old = {d.name: old_digest(d) for d in (cached, fetched, uploaded, lost)}
    shutil.copytree(cached, root / "cache" / old["cached"])
    shutil.copytree(uploaded, root / "uploads" / old["up"])
    write_v1_registry(
        root,
        [
            ("cached", old["cached"], str(cached), {"tenant": "hospital"}),
            ("fetched", old["fetched"], str(fetched), {}),
            ("up", old["up"], f"upload:{old['up']}", {}),
            ("lost", old["lost"], str(lost), {}),
        ],
    )
    write_adapter(lost, seed=5)
    store = open_store(tmp_path)
    for name, directory in (("cached", cached), ("fetched", fetched), ("up", uploaded)):
        version = store.version(name)
        assert version.version == content_digest(directory) and not version.legacy_digest
        with lease(store, name) as adapter:
            assert content_digest(adapter.path) == version.version
    assert store.version("up").source == f"upload:{content_digest(uploaded)}"
    assert (root / "uploads" / content_digest(uploaded)).is_dir()
    assert store.tenant("cached") == "hospital"
    legacy = store.version("lost")  # still registered, flagged, refused at lease with the fix
    assert legacy.version == old["lost"] and legacy.legacy_digest
    with pytest.raises(LegacyDigest, match="register its files again"):
        store.acquire(legacy)
    assert f"{old['lost'][:16]}" in caplog.text
    store.close()
