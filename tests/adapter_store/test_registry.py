"""The registry on both backends (SQLite file, PostgreSQL): refs, versions, aliases, pins, health, concurrency.

Every test that takes ``open_registry`` (or ``registry``) runs once per backend;
PostgreSQL ones get a fresh database on the session's throwaway cluster.
Schema-1 files are SQLite only (PostgreSQL came after them).
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from adapter_store import (
    AdapterMetadata,
    AdapterNotFound,
    AdapterPinned,
    AdapterRef,
    AmbiguousVersion,
    InvalidRef,
    OwnershipConflict,
    VersionConflict,
)
from adapter_store.registry import DB_NAME, AdapterRegistry
from adapter_store.schema import versions
from tests.adapter_store.helpers import write_v1_registry
from tests.forked import forkserver

META = AdapterMetadata(base_model="base", rank=8, alpha=16.0, target_modules=("q_proj", "v_proj"), size_bytes=1234)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


OpenRegistry = Callable[..., AdapterRegistry]


@pytest.fixture(params=["sqlite", "postgresql"])
def backend_url(request: pytest.FixtureRequest) -> str | None:
    """The registry URL of one backend: None (the SQLite file under the store root) or a fresh PostgreSQL database."""
    return None if request.param == "sqlite" else request.getfixturevalue("postgres_url")


@pytest.fixture
def open_registry(tmp_path: Path, backend_url: str | None) -> Iterator[OpenRegistry]:
    """Opens registries on one database (as several processes or restarts would); closes them after the test."""
    opened: list[AdapterRegistry] = []

    def open_(**kwargs: object) -> AdapterRegistry:
        opened.append(AdapterRegistry(tmp_path / "store", url=backend_url, **kwargs))  # type: ignore[arg-type]
        return opened[-1]

    yield open_
    for reg in opened:
        reg.close()


@pytest.fixture
def registry(open_registry: OpenRegistry) -> AdapterRegistry:
    return open_registry()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("code", AdapterRef("code", alias="latest")),
        ("code@stable", AdapterRef("code", alias="stable")),
        ("my.adapter_v2-x@canary", AdapterRef("my.adapter_v2-x", alias="canary")),
        ("code@DEADBEEF", AdapterRef("code", version="deadbeef")),
        ("code@" + "a" * 64, AdapterRef("code", version="a" * 64)),
    ],
)
def test_parse_valid_refs(text: str, expected: AdapterRef) -> None:
    assert AdapterRef.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "adapter name ''"),
        ("-code", "starting with a letter or digit"),
        ("co de", "adapter name 'co de'"),
        ("x" * 65, "1-64 characters"),
        ("code@abc", "at least 8 hex digits"),
        ("code@" + "a" * 65, "64 hex digits"),
        ("code@1stable", "starting with a letter"),
        ("code@sta ble", "alias 'sta ble'"),
        ("code@a@b", "alias 'a@b'"),
        ("../etc@x", "adapter name '../etc'"),
        ("code\n", "adapter name 'code\\n'"),  # `$` alone would let a trailing newline through
        ("code@stable\n", "alias 'stable\\n'"),
        ("code@deadbeef\n", "alias 'deadbeef\\n'"),
    ],
)
def test_parse_invalid_refs(text: str, fragment: str) -> None:
    with pytest.raises(InvalidRef) as info:
        AdapterRef.parse(text)
    assert fragment in info.value.message


def test_register_versions_latest_and_aliases(registry: AdapterRegistry) -> None:
    v1, created = registry.register("code", digest("one"), META, source="file:///a", tags={"team": "x"})
    assert created and v1.version == digest("one") and v1.checksum == f"sha256:{digest('one')}"
    again, created = registry.register("code", digest("one"), META, source="file:///other")
    assert not created and again == v1  # immutable: source of the first registration kept
    v2, _ = registry.register("code", digest("two"), META, source="file:///b", aliases=("canary",))
    assert registry.get("code") == v2 and registry.get("code@latest") == v2
    assert registry.get("code@canary") == v2
    assert registry.get(f"code@{digest('one')[:8]}") == v1
    registry.set_alias("code", "stable", digest("one"))
    assert registry.get("code@stable") == v1
    assert registry.aliases("code") == {"canary": digest("two"), "latest": digest("two"), "stable": digest("one")}
    assert [v.version for v in registry.versions("code")] == [digest("two"), digest("one")]
    assert registry.get("code@stable").tags == {"team": "x"}


@pytest.mark.parametrize(
    ("ref", "error", "fragment"),
    [
        ("nope", AdapterNotFound, "adapter 'nope' is not registered"),
        ("code@stable", AdapterNotFound, "has no alias 'stable'; its aliases are latest"),
        ("code@" + "f" * 8, AdapterNotFound, "has no version 'ffffffff'"),
    ],
)
def test_missing_refs(registry: AdapterRegistry, ref: str, error: type, fragment: str) -> None:
    registry.register("code", digest("one"), META, source="s")
    with pytest.raises(error) as info:
        registry.get(ref)
    assert fragment in info.value.message


def test_ambiguous_prefix(registry: AdapterRegistry) -> None:
    a, b = "abcdef01" + "0" * 56, "abcdef01" + "1" * 56
    registry.register("code", a, META, source="s")
    registry.register("code", b, META, source="s")
    with pytest.raises(AmbiguousVersion, match="give more hex digits"):
        registry.get("code@abcdef01")
    assert registry.get("code@abcdef010").version == a


@pytest.mark.parametrize("alias", ["latest", "beef", "9lives"])
def test_alias_rules(registry: AdapterRegistry, alias: str) -> None:
    registry.register("code", digest("one"), META, source="s")
    with pytest.raises(InvalidRef):
        registry.set_alias("code", alias, digest("one"))


def test_alias_compare_and_set(registry: AdapterRegistry) -> None:
    registry.register("code", digest("one"), META, source="s")
    registry.register("code", digest("two"), META, source="s")
    registry.set_alias("code", "stable", digest("one"))
    with pytest.raises(VersionConflict, match="someone changed it"):
        registry.set_alias("code", "stable", digest("two"), expected=digest("two")[:8])
    assert registry.get("code@stable").version == digest("one")
    registry.set_alias("code", "stable", digest("two"), expected=digest("one")[:8])
    assert registry.get("code@stable").version == digest("two")


def test_delete_rules(registry: AdapterRegistry) -> None:
    registry.register("code", digest("one"), META, source="s")
    registry.register("code", digest("two"), META, source="s")
    registry.set_alias("code", "stable", digest("one"))
    with pytest.raises(VersionConflict, match="alias\\(es\\) stable"):
        registry.delete(f"code@{digest('one')}")
    registry.remove_alias("code", "stable")
    registry.set_pinned(f"code@{digest('one')}", True)
    assert [v.version for v in registry.pinned()] == [digest("one")]
    with pytest.raises(AdapterPinned, match="unpin it"):
        registry.delete(f"code@{digest('one')}")
    registry.set_pinned(f"code@{digest('one')}", False)
    registry.delete("code")  # latest = two
    assert registry.get("code").version == digest("one")  # latest moved back
    registry.delete("code")
    assert registry.names() == []
    with pytest.raises(AdapterNotFound):
        registry.versions("code")


def test_health_records(registry: AdapterRegistry) -> None:
    v, _ = registry.register("code", digest("one"), META, source="s")
    assert registry.health("code", v.version).state == "unchecked"
    registry.record_health("code", v.version, "failed", reason="load error: bad shape", latency_s=0.25)
    record = registry.health("code", v.version)
    assert (record.state, record.reason, record.latency_s) == ("failed", "load error: bad shape", 0.25)
    assert record.checked_at is not None
    with pytest.raises(AdapterNotFound):
        registry.record_health("code", digest("nope"), "ok")


def test_survives_reopen(open_registry: OpenRegistry) -> None:
    first = open_registry()
    first.register("code", digest("one"), META, source="s", tags={"k": "v"})
    first.set_alias("code", "stable", digest("one"))
    first.close()
    second = open_registry()
    assert second.get("code@stable").tags == {"k": "v"}
    assert second.get("code@stable").metadata == META


def test_sqlite_file_is_in_wal_mode_under_the_root(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path / "store")
    assert registry.path == tmp_path / "store" / DB_NAME and str(registry.url) == f"sqlite:///{registry.path}"
    registry.close()
    with sqlite3.connect(tmp_path / "store" / DB_NAME) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _writer(
    root: Path, url: str | None, worker: int, count: int, shared: bool, registry: AdapterRegistry | None = None
) -> None:
    reg = registry if shared and registry is not None else AdapterRegistry(root, url=url, busy_timeout_s=60)
    for i in range(count):
        d = digest(f"{worker}-{i}")
        reg.register("shared", d, META, source=f"w{worker}")
        reg.register(f"own-{worker}", d, META, source=f"w{worker}")
        reg.set_alias("shared", "stable", d)
        reg.record_health("shared", d, "ok", latency_s=0.01)
    if not shared:
        reg.close()


def _check_consistent(root: Path, url: str | None, workers: int, count: int) -> None:
    reg = AdapterRegistry(root, url=url)
    versions = reg.versions("shared")
    assert len(versions) == workers * count
    assert {v.version for v in versions} == {digest(f"{w}-{i}") for w in range(workers) for i in range(count)}
    assert reg.get("shared").version == versions[0].version  # latest = the last one committed
    assert reg.get("shared@stable").version in {v.version for v in versions}
    for w in range(workers):
        assert len(reg.versions(f"own-{w}")) == count
    path = reg.path
    reg.close()
    if path is not None:
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.parametrize("shared", [True, False], ids=["one-registry", "registry-per-thread"])
def test_concurrent_threads(tmp_path: Path, backend_url: str | None, shared: bool) -> None:
    root, workers, count = tmp_path / "store", 6, 15
    registry = AdapterRegistry(root, url=backend_url)
    threads = [
        threading.Thread(target=_writer, args=(root, backend_url, w, count, shared, registry)) for w in range(workers)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    registry.close()
    _check_consistent(root, backend_url, workers, count)


def test_concurrent_processes(tmp_path: Path, backend_url: str | None) -> None:
    root, workers, count = tmp_path / "store", 4, 15
    procs = [forkserver().Process(target=_writer, args=(root, backend_url, w, count, False)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * workers
    _check_consistent(root, backend_url, workers, count)


# -- ownership: set on the name by its first registration, never changed by a later version ----------


def test_owner_is_set_once_and_versions_inherit_it(registry: AdapterRegistry) -> None:
    registry.register("medical", digest("one"), META, source="s", tenant="hospital")
    registry.register("medical", digest("two"), META, source="s", tenant="hospital")  # a new version: same owner
    assert registry.owner("medical") == "hospital"
    for tenant in ("lawfirm", None):  # another tenant, or none (public), is refused: new files...
        with pytest.raises(OwnershipConflict, match="belongs to tenant 'hospital'") as info:
            registry.register("medical", digest("three"), META, source="s", tenant=tenant)
        assert isinstance(info.value, VersionConflict) and info.value.param == "tenant"
        with pytest.raises(OwnershipConflict):  # ...and the very same files as an existing version
            registry.register("medical", digest("one"), META, source="s", tenant=tenant)
        with pytest.raises(OwnershipConflict):
            registry.check_owner("medical", tenant)
    assert registry.owner("medical") == "hospital"
    assert [v.version for v in registry.versions("medical")] == [digest("two"), digest("one")]


def test_a_public_name_stays_public(registry: AdapterRegistry) -> None:
    registry.register("code", digest("one"), META, source="s")
    with pytest.raises(OwnershipConflict, match="belongs to no tenant \\(public\\)"):
        registry.register("code", digest("two"), META, source="s", tenant="hospital")
    assert registry.owner("code") is None and len(registry.versions("code")) == 1


def test_owner_of_an_unknown_name_is_not_found(registry: AdapterRegistry) -> None:
    with pytest.raises(AdapterNotFound):
        registry.owner("nothing")


def test_ownership_ends_with_the_last_version(registry: AdapterRegistry) -> None:
    registry.register("code", digest("one"), META, source="s", tenant="a")
    registry.delete("code")
    registry.register("code", digest("two"), META, source="s", tenant="b")
    assert registry.owner("code") == "b"


def test_rekey_on_either_backend(registry: AdapterRegistry) -> None:
    """Re-keying (``adapter_store.migration``) changes parent and child keys in one transaction on both backends."""
    old, new = digest("old"), digest("new")
    registry.register("code", old, META, source=f"upload:{old}", aliases=("stable",))
    registry.register("copy", old, META, source="file:///x")
    registry.record_health("code", old, "ok")
    with registry._db.engine.begin() as conn:  # white-box: versions as a schema-1 file's upgrade leaves them
        conn.execute(versions.update().values(legacy_digest=1))
    assert registry.legacy_digests() == [old]
    registry.rekey(old, new, move=lambda: None)
    code, copy = registry.get("code@stable"), registry.get("copy")
    assert (code.version, code.source, code.legacy_digest) == (new, f"upload:{new}", False)
    assert (copy.version, copy.source, registry.get("copy@latest").version) == (new, "file:///x", new)
    assert registry.health("code", new).state == "ok" and registry.legacy_digests() == []


# -- schema 1 files are upgraded in place --------------------------------------------------------------


def test_v1_owner_comes_from_the_oldest_version_and_a_tenant_beats_public(tmp_path: Path, caplog) -> None:
    write_v1_registry(
        tmp_path,
        [
            ("medical", digest("m1"), "s", {"tenant": "hospital"}),
            ("medical", digest("m2"), "s", {}),  # the later public upload that made every version public
            ("mixed", digest("x1"), "s", {}),
            ("mixed", digest("x2"), "s", {"tenant": "lawfirm"}),
            ("code", digest("c1"), "s", {"team": "x"}),
        ],
    )
    registry = AdapterRegistry(tmp_path)
    assert [registry.owner(n) for n in ("medical", "mixed", "code")] == ["hospital", "lawfirm", None]
    assert "'mixed'" in caplog.text and "'medical'" in caplog.text and "'code'" not in caplog.text
    assert all(v.legacy_digest for v in registry.all_versions())
    assert registry.legacy_digests() == sorted(digest(t) for t in ("m1", "m2", "x1", "x2", "c1"))
    assert sqlite3.connect(tmp_path / DB_NAME).execute("PRAGMA user_version").fetchone()[0] == 2
    registry.close()


def test_rekey_moves_versions_aliases_health_and_upload_sources(tmp_path: Path) -> None:
    old, new = digest("old"), digest("new")
    write_v1_registry(tmp_path, [("code", old, f"upload:{old}", {}), ("copy", old, "file:///x", {})])
    registry = AdapterRegistry(tmp_path)
    registry.set_alias("code", "stable", "latest")
    registry.record_health("code", old, "ok")
    moved = []
    registry.rekey(old, new, move=lambda: moved.append(True))
    assert moved == [True] and registry.legacy_digests() == []
    code, copy = registry.get("code@stable"), registry.get("copy")
    assert (code.version, code.source, code.legacy_digest) == (new, f"upload:{new}", False)
    assert (copy.version, copy.source) == (new, "file:///x")
    assert registry.health("code", new).state == "ok"


def test_a_failed_move_changes_nothing(tmp_path: Path) -> None:
    old = digest("old")
    write_v1_registry(tmp_path, [("code", old, "s", {})])
    registry = AdapterRegistry(tmp_path)

    def fail() -> None:
        raise OSError("disk full")

    with pytest.raises(OSError):
        registry.rekey(old, digest("new"), move=fail)
    assert registry.get("code").version == old and registry.legacy_digests() == [old]


def test_v1_owners_set_by_the_config_win_over_tags(tmp_path: Path) -> None:
    """Schema 1 took configured adapters' owners from serving's config, not from the registry file."""
    write_v1_registry(tmp_path, [("medical", digest("m1"), "s", {}), ("legal", digest("l1"), "s", {"tenant": "x"})])
    registry = AdapterRegistry(tmp_path, configured_owners={"medical": "hospital", "legal": None})
    assert (registry.owner("medical"), registry.owner("legal")) == ("hospital", None)
    registry.close()
    again = AdapterRegistry(tmp_path, configured_owners={"medical": "other"})  # schema 2 now: the file decides
    assert again.owner("medical") == "hospital"
    again.close()


class _BusyThenFree:
    """A connection whose switch to WAL is refused ``busy`` times with SQLITE_BUSY (another connection holds the
    database), as SQLite answers at once where its busy handler could deadlock; then it succeeds."""

    def __init__(self, busy: int) -> None:
        self.busy, self.mode = busy, "delete"

    def execute(self, sql: str) -> Any:
        if sql == "PRAGMA journal_mode":
            return _Row(self.mode)
        if self.busy:
            self.busy -= 1
            error = sqlite3.OperationalError("database is locked")
            error.sqlite_errorcode = sqlite3.SQLITE_BUSY  # type: ignore[attr-defined]
            raise error
        self.mode = "wal"
        return _Row(self.mode)


class _Row:
    def __init__(self, value: str) -> None:
        self.value = value

    def fetchone(self) -> tuple[str]:
        return (self.value,)


def test_the_switch_to_wal_waits_out_a_busy_database_until_its_deadline() -> None:
    """Processes opening a new SQLite registry together: the one refused the journal-mode switch retries until
    the busy timeout's deadline, then the error is raised; a database already in WAL is not switched again."""
    from adapter_store.registry_db import _wal

    conn = _BusyThenFree(busy=3)
    _wal(conn, time.monotonic() + 5)  # type: ignore[arg-type]
    assert conn.mode == "wal" and conn.busy == 0
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        _wal(_BusyThenFree(busy=10**6), time.monotonic() + 0.05)  # type: ignore[arg-type]
    done = _BusyThenFree(busy=1)
    done.mode = "wal"
    _wal(done, time.monotonic())  # type: ignore[arg-type]
    assert done.busy == 1  # read, not switched
