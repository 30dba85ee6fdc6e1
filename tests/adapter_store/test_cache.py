"""The disk tier: atomic fetches, LRU eviction within a measured byte budget, pins and leases."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from adapter_store import AdapterInUse, AdapterVersion, CacheFull, InvalidAdapter, content_digest
from adapter_store.cache import DiskCache
from adapter_store.digest import directory_size
from adapter_store.registry import AdapterRegistry
from adapter_store.settings import LocalSourceSettings
from adapter_store.sources import SourceSet
from adapter_store.validation import AdapterValidator, BaseModelSpec, register_directory
from tests.adapter_store.helpers import BASE_NAME, write_adapter, write_base_config
from tests.adapter_store.test_catalog import within


class World:
    """A local source volume with adapters registered in a real registry, and a cache over them."""

    def __init__(self, tmp_path: Path, count: int) -> None:
        self.tmp = tmp_path
        self.volume = tmp_path / "volume"
        self.registry = AdapterRegistry(tmp_path / "store")
        self.sources = SourceSet([LocalSourceSettings(type="local", roots=[self.volume])])
        spec = BaseModelSpec.from_config(write_base_config(tmp_path / "base"), [BASE_NAME])
        self.validator = validator = AdapterValidator(spec, max_lora_rank=16)
        self.versions: list[AdapterVersion] = []
        for i in range(count):
            directory = write_adapter(self.volume / f"a{i}", rank=4 if i % 2 else 8, seed=i)
            version, _ = register_directory(self.registry, validator, f"a{i}", directory, source=directory.as_uri())
            self.versions.append(version)
        self.sizes = [v.metadata.size_bytes for v in self.versions]

    def cache(self, budget: int) -> DiskCache:
        return DiskCache(
            self.tmp / "store" / "cache",
            self.tmp / "store" / "staging",
            budget,
            fetch=lambda uri, dest: self.sources.fetch(uri, dest, max_bytes=1 << 20),
            check=self.validator.validate,
            pinned=lambda: {v.version for v in self.registry.pinned()},
        )


def measured(cache: DiskCache) -> int:
    """Bytes under the cache directory, walked independently of the cache's own accounting."""
    total = 0
    for parent, _, names in os.walk(cache.cache_dir):
        for name in names:
            with contextlib.suppress(FileNotFoundError):  # another thread may be evicting while we walk
                total += os.stat(os.path.join(parent, name)).st_size
    return total


def zipf_indices(n: int, steps: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n + 1) ** 1.1
    return list(rng.choice(n, size=steps, p=weights / weights.sum()))


def test_lru_order(tmp_path: Path) -> None:
    world = World(tmp_path, 3)
    a, b, c = world.versions
    cache = world.cache(budget=world.sizes[0] + world.sizes[2] + 100)  # a with b or with c fit, not all three
    for version in (a, b, a, c):
        with cache.lease(version) as path:
            assert content_digest(path) == version.version
    assert cache.digests() == [a.version, c.version]  # b was least recently used
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (1, 3, 1)


@pytest.mark.parametrize("threads", [1, 4], ids=["sequential", "4-threads"])
def test_zipf_access_stays_within_budget(tmp_path: Path, threads: int) -> None:
    """More adapters than fit, Zipf popularity: every read is correct and the budget always holds."""
    world = World(tmp_path, 12)
    pinned, held = world.versions[11], world.versions[10]  # the least popular ones: eviction would pick them
    # Room for the pinned and held versions plus one lease per thread and one more: about half of them.
    budget = pinned.metadata.size_bytes + held.metadata.size_bytes + (threads + 1) * max(world.sizes)
    assert budget < sum(world.sizes)
    world.registry.set_pinned(pinned.ref, True)
    cache = world.cache(budget)
    errors: list[BaseException] = []

    def client(seed: int) -> None:
        try:
            for index in zipf_indices(12, 150, seed):
                version = world.versions[index]
                with cache.lease(version) as path:
                    assert content_digest(path) == version.version
                assert measured(cache) <= budget
        except BaseException as e:
            errors.append(e)

    with cache.lease(held):  # in use for the whole run
        with cache.lease(pinned):
            pass
        workers = [threading.Thread(target=client, args=(seed,)) for seed in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert not errors, errors
        assert cache.contains(held.version) and cache.contains(pinned.version)
    assert measured(cache) <= budget
    assert measured(cache) == cache.used_bytes() == directory_size(cache.cache_dir)
    assert cache.stats.evictions > 0 and cache.stats.hits > 0
    assert cache.contains(pinned.version)
    assert list(cache.staging_dir.iterdir()) == []


def test_cache_full_when_pinned_and_leased_fill_the_budget(tmp_path: Path) -> None:
    world = World(tmp_path, 3)
    a, b, c = world.versions
    world.registry.set_pinned(a.ref, True)
    cache = world.cache(budget=world.sizes[0] + world.sizes[2] + 100)  # a with b or with c, never all three
    with cache.lease(a), cache.lease(b):
        before = measured(cache)
        with pytest.raises(CacheFull) as info:
            cache.acquire(c)
        assert f"a2@{c.version[:16]} needs {c.metadata.size_bytes} bytes" in info.value.message
        assert "raise store.disk_budget_bytes or unpin adapters" in info.value.message
        assert measured(cache) == before
    with cache.lease(c) as path:  # b is no longer leased: it goes, the pinned a stays
        assert content_digest(path) == c.version
    assert set(cache.digests()) == {a.version, c.version}


def test_changed_source_fails_the_checksum_and_leaves_nothing(tmp_path: Path) -> None:
    world = World(tmp_path, 1)
    (version,) = world.versions
    write_adapter(world.volume / "a0", rank=8, seed=99)  # same path, other weights
    cache = world.cache(budget=1 << 20)
    with pytest.raises(InvalidAdapter) as info:
        cache.acquire(version)
    assert info.value.reason == "checksum_mismatch"
    assert "the source changed after registration" in info.value.message
    assert measured(cache) == 0 and cache.used_bytes() == 0
    assert list(cache.staging_dir.iterdir()) == []


def test_remove_refused_while_leased(tmp_path: Path) -> None:
    world = World(tmp_path, 1)
    (version,) = world.versions
    cache = world.cache(budget=1 << 20)
    with cache.lease(version), pytest.raises(AdapterInUse, match="in use by 1 running request"):
        cache.remove(version.version)
    cache.remove(version.version)
    assert measured(cache) == 0


def test_restart_keeps_intact_entries_and_drops_corrupt_ones(tmp_path: Path) -> None:
    world = World(tmp_path, 3)
    a, b, c = world.versions
    cache = world.cache(budget=1 << 20)
    for version in (a, b, c):
        with cache.lease(version):
            pass
    corrupt = cache.cache_dir / b.version / "adapter_model.safetensors"
    corrupt.write_bytes(corrupt.read_bytes()[:-10])
    (cache.staging_dir / "half-done").mkdir()
    again = world.cache(budget=1 << 20)
    assert set(again.digests()) == {a.version, c.version}
    assert list(again.staging_dir.iterdir()) == []
    smaller = world.cache(budget=world.sizes[2] + 10)  # restart with a smaller budget: oldest go first
    assert smaller.digests() == [c.version]
    assert measured(smaller) <= world.sizes[2] + 10


@pytest.mark.parametrize(
    ("interval_s", "dated_again"),
    [(0.0, True), (3600.0, False)],  # a hit dates the directory again only once the interval has passed
)
@pytest.mark.parametrize("hit", ["lease", "acquire_cached"])
def test_a_hit_dates_the_directory_at_most_once_per_interval(
    tmp_path: Path, interval_s: float, dated_again: bool, hit: str
) -> None:
    world = World(tmp_path, 1)
    (version,) = world.versions
    cache = world.cache(budget=1 << 20)
    cache.touch_interval_s = interval_s
    for _ in range(2):  # the fetch, then a first hit that dates it
        with cache.lease(version):
            pass
    directory = cache.cache_dir / version.version
    os.utime(directory, ns=(1, 1))
    if hit == "lease":
        with cache.lease(version):
            pass
    else:
        assert cache.acquire_cached(version.version) == directory
        cache.release(version.version)
    assert (directory.stat().st_mtime_ns != 1) is dated_again


# How a cached file gets damaged while the server runs: swapped for other bytes, truncated, rewritten in place.
DAMAGE = {
    "swapped": lambda f: (
        f.with_suffix(".new").write_bytes(b"\0" * f.stat().st_size),
        f.with_suffix(".new").replace(f),
    ),
    "truncated": lambda f: f.write_bytes(f.read_bytes()[:-10]),
    "rewritten_same_size": lambda f: f.write_bytes(bytes(reversed(f.read_bytes()))),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_cached_copy_is_fetched_again_from_an_intact_source(tmp_path: Path, damage) -> None:
    world = World(tmp_path, 1)
    (version,) = world.versions
    cache = world.cache(budget=1 << 20)
    with cache.lease(version):
        pass
    damage(cache.cache_dir / version.version / "adapter_model.safetensors")
    with cache.lease(version) as path:
        assert content_digest(path) == version.version
    assert (cache.stats.corrupt, cache.stats.misses) == (1, 2)


def test_damaged_cached_copy_of_a_changed_source_is_not_served(tmp_path: Path) -> None:
    world = World(tmp_path, 1)
    (version,) = world.versions
    cache = world.cache(budget=1 << 20)
    with cache.lease(version):
        pass
    DAMAGE["truncated"](cache.cache_dir / version.version / "adapter_model.safetensors")
    write_adapter(world.volume / "a0", rank=8, seed=99)
    with pytest.raises(InvalidAdapter) as info:
        cache.acquire(version)
    assert info.value.reason == "checksum_mismatch"
    assert not cache.contains(version.version) and measured(cache) == 0


def test_touched_but_unchanged_copy_is_still_a_hit(tmp_path: Path) -> None:
    world = World(tmp_path, 1)
    (version,) = world.versions
    cache = world.cache(budget=1 << 20)
    with cache.lease(version):
        pass
    os.utime(cache.cache_dir / version.version / "adapter_config.json", ns=(1, 1))
    with cache.lease(version):
        pass
    assert (cache.stats.hits, cache.stats.misses, cache.stats.corrupt) == (1, 1, 0)


def test_a_full_cache_waits_for_a_running_request_to_release(tmp_path: Path) -> None:
    world = World(tmp_path, 2)
    a, b = world.versions
    cache = world.cache(budget=max(world.sizes))
    cache.lease_wait_s = 10
    got: list[Path] = []
    with cache.lease(a):
        waiter = threading.Thread(target=lambda: got.append(cache.acquire(b)))
        waiter.start()
        waiter.join(timeout=0.5)
        assert waiter.is_alive() and not got  # b waits: a is in use and the budget holds one
    waiter.join(timeout=10)
    assert got == [cache.cache_dir / b.version] and cache.digests() == [b.version]
    cache.release(b.version)


# -- every file set is validated before it enters the cache ------------------------------------------


def _pickle_adapter(directory: Path) -> Path:
    """Files vLLM would torch.load: a pickle weights file and no safetensors."""
    write_adapter(directory, seed=99)
    (directory / "adapter_model.safetensors").unlink()
    (directory / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    return directory


def test_a_refetch_is_validated_before_it_is_cached(tmp_path: Path) -> None:
    """A version whose digest matches files that were never validated (an older registry, an older scheme)."""
    world = World(tmp_path, 1)
    bad = _pickle_adapter(world.volume / "bad")
    meta = world.versions[0].metadata
    version, _ = world.registry.register("bad", content_digest(bad), meta, source=bad.as_uri())
    cache = world.cache(budget=1 << 20)
    with pytest.raises(InvalidAdapter) as info:
        cache.acquire(version)
    assert info.value.reason == "pickle_weights"
    assert not cache.contains(version.version) and not (cache.cache_dir / version.version).exists()
    assert list(cache.staging_dir.iterdir()) == [] and cache.used_bytes() == 0


def test_a_refetch_after_eviction_is_validated_again(tmp_path: Path) -> None:
    world = World(tmp_path, 1)
    (version,) = world.versions
    checked: list[Path] = []
    cache = DiskCache(
        tmp_path / "store" / "cache",
        tmp_path / "store" / "staging",
        1 << 20,
        fetch=lambda uri, dest: world.sources.fetch(uri, dest, max_bytes=1 << 20),
        check=lambda path: (checked.append(path), world.validator.validate(path)),
    )
    with cache.lease(version):
        pass
    cache.remove(version.version)  # evicted: the next lease fetches again
    with cache.lease(version) as path:
        assert content_digest(path) == version.version
    assert len(checked) == 2 and all(p.parent == cache.staging_dir for p in checked)


def test_an_invalid_leftover_of_a_previous_run_is_dropped(tmp_path: Path) -> None:
    world = World(tmp_path, 1)
    cache = world.cache(budget=1 << 20)
    with cache.lease(world.versions[0]):
        pass
    bad = _pickle_adapter(tmp_path / "bad")
    leftover = cache.cache_dir / content_digest(bad)
    bad.rename(leftover)  # named by its own digest: intact, but never valid
    again = world.cache(budget=1 << 20)
    assert again.digests() == [world.versions[0].version]
    assert not leftover.exists()


def test_adopt_refuses_invalid_files(tmp_path: Path) -> None:
    world = World(tmp_path, 0)
    cache = world.cache(budget=1 << 20)
    staging = _pickle_adapter(cache.new_staging())
    with pytest.raises(InvalidAdapter, match="pickle"):
        cache.adopt(staging, content_digest(staging), "bad@x")
    assert cache.digests() == [] and cache.used_bytes() == 0


def test_fetch_locks_are_dropped_when_no_one_holds_them(tmp_path: Path) -> None:
    """A lock per version ever fetched would grow with every version the store has seen; only held ones stay."""
    world = World(tmp_path, 4)
    cache = world.cache(budget=sum(world.sizes))
    for version in world.versions:
        with cache.lease(version):
            pass
    assert cache._fetch_locks == {}


def test_a_registration_adopting_files_while_a_request_fetches_them_does_not_collide(tmp_path: Path) -> None:
    """On demand, a request may find the version registered and fetch it while the registration moves its copy in."""
    world = World(tmp_path, 1)
    version = world.versions[0]
    adopted, errors = threading.Event(), []

    def adopt() -> None:
        staging = cache.new_staging()
        world.sources.fetch(version.source, staging, max_bytes=1 << 20)
        try:
            cache.adopt(staging, version.version, "registration")
        except Exception as e:
            errors.append(e)
        adopted.set()

    def fetch_while_adopting(uri: str, dest: Path) -> None:
        world.sources.fetch(uri, dest, max_bytes=1 << 20)
        threading.Thread(target=adopt).start()
        # Until the registration waits for the version's fetch lock (this request holds it), or, unfixed, is done:
        # then its rename lands here, before the request's. A fixed wait (1 s) cost the test its whole length.
        within(10.0, lambda: adopted.is_set() or cache._fetch_locks[version.version].holders > 1)

    cache = DiskCache(
        tmp_path / "store" / "cache",
        tmp_path / "store" / "staging",
        sum(world.sizes),
        fetch=fetch_while_adopting,
        check=world.validator.validate,
    )
    with cache.lease(version) as path:
        assert content_digest(path) == version.version
    assert adopted.wait(timeout=10) and errors == []
    assert cache.digests() == [version.version] and content_digest(cache.cache_dir / version.version) == version.version
