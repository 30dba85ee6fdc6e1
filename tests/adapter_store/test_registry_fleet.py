"""The registry as a fleet shares it: PostgreSQL writers in several processes, migrations, change notices, outages.

Also the schema itself on both backends (Alembic's head is what ``adapter_store.schema``
defines; files from before Alembic are adopted) and the ``store.registry`` setting.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from pydantic import ValidationError

from adapter_store import (
    AdapterMetadata,
    OwnershipConflict,
    RegistryUnavailable,
    StoreSettings,
    VersionConflict,
    migrations,
)
from adapter_store.registry import DB_NAME, AdapterRegistry
from adapter_store.registry_db import CONNECT_TIMEOUT_S, NOTIFY_CHANNEL, TCP_TIMEOUTS
from adapter_store.schema import metadata
from tests.adapter_store.helpers import write_v1_registry
from tests.forked import forkserver
from tests.postgres import PASSWORD, PostgresCluster

META = AdapterMetadata(base_model="base", rank=8, alpha=16.0, target_modules=("q_proj",), size_bytes=10)
PROCESSES = forkserver()  # a process per writer, each with its own connections, started in milliseconds


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def pg_registry(tmp_path: Path, postgres_url: str) -> Iterator[AdapterRegistry]:
    registry = AdapterRegistry(tmp_path, url=postgres_url)
    yield registry
    registry.close()


def _run_workers(target: Any, args: list[tuple]) -> list[Any]:
    """Run ``target(barrier, queue, *a)`` in one process per ``a``, started together; what each put."""
    barrier, queue = PROCESSES.Barrier(len(args)), PROCESSES.Queue()
    procs = [PROCESSES.Process(target=target, args=(barrier, queue, *a)) for a in args]
    for p in procs:
        p.start()
    results = [queue.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * len(procs), results
    return results


# -- several processes writing one PostgreSQL registry ------------------------------------------------


def _claimer(barrier: Any, queue: Any, url: str, tenant: str, names: list[str]) -> None:
    registry = AdapterRegistry(Path("/nonexistent"), url=url)
    barrier.wait()
    won, outcome = [], "ok"
    try:
        for name in names:
            try:
                registry.register(name, digest(f"{name}-{tenant}"), META, source="s", tenant=tenant)
                won.append(name)
            except OwnershipConflict:
                pass
    except Exception as e:  # anything but the refusal is a failure the parent reports
        outcome = f"{type(e).__name__}: {e}"
    queue.put((tenant, won, outcome))
    registry.close()


def test_name_ownership_race_has_one_winner_per_name(pg_registry: AdapterRegistry, postgres_url: str) -> None:
    """Tenants race to register the same new names: each name gets exactly one owner and only its version."""
    names = [f"contested-{i}" for i in range(25)]
    results = _run_workers(_claimer, [(postgres_url, f"tenant{w}", names) for w in range(4)])
    assert [outcome for _, _, outcome in results] == ["ok"] * 4
    winners = {name: tenant for tenant, won, _ in results for name in won}
    assert sorted(winners) == sorted(names) and sum(len(won) for _, won, _ in results) == len(names)  # one winner each
    for name, tenant in winners.items():
        assert pg_registry.owner(name) == tenant
        assert [v.version for v in pg_registry.versions(name)] == [digest(f"{name}-{tenant}")]


def _flipper(barrier: Any, queue: Any, url: str, worker: int, attempts: int) -> None:
    registry = AdapterRegistry(Path("/nonexistent"), url=url)
    barrier.wait()
    flips = []
    for i in range(attempts):
        current = registry.aliases("flip")["stable"]
        try:
            registry.set_alias("flip", "stable", digest(f"{worker}-{i}"), expected=current)
            flips.append((current, digest(f"{worker}-{i}")))
        except VersionConflict:
            pass
    queue.put(flips)
    registry.close()


def test_alias_compare_and_set_loses_no_update_across_processes(
    pg_registry: AdapterRegistry, postgres_url: str
) -> None:
    """Every successful compare-and-set replaced a distinct value: the flips form one chain, none lost."""
    workers, attempts = 4, 25
    pg_registry.register("flip", digest("start"), META, source="s", aliases=("stable",))
    for w in range(workers):
        for i in range(attempts):
            pg_registry.register("flip", digest(f"{w}-{i}"), META, source="s")
    flips = [
        f for result in _run_workers(_flipper, [(postgres_url, w, attempts) for w in range(workers)]) for f in result
    ]
    replaced = [before for before, _ in flips]
    assert len(set(replaced)) == len(replaced), "two compare-and-sets replaced the same value: one update was lost"
    chain, current = dict(flips), digest("start")
    for _ in flips:
        current = chain[current]
    assert pg_registry.get("flip@stable").version == current  # the end of the one chain through every flip


# -- migrations ------------------------------------------------------------------------------------------


def _opener(barrier: Any, queue: Any, url: str) -> None:
    barrier.wait()
    try:
        AdapterRegistry(Path("/nonexistent"), url=url).close()
        queue.put("ok")
    except Exception as e:
        queue.put(f"{type(e).__name__}: {e}")


def _revisions(registry: AdapterRegistry) -> list[str]:
    with registry._db.engine.connect() as conn:  # white-box: Alembic's own table
        return [r[0] for r in conn.exec_driver_sql("SELECT version_num FROM alembic_version")]


def test_replicas_opening_an_empty_database_together_create_it_once(tmp_path: Path, postgres_url: str) -> None:
    assert _run_workers(_opener, [(postgres_url,)] * 4) == ["ok"] * 4
    registry = AdapterRegistry(tmp_path, url=postgres_url)  # and once more, at head already: nothing to do
    assert _revisions(registry) == [migrations.head()]
    registry.close()


def _schema_diff(registry: AdapterRegistry) -> list:
    with registry._db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        return compare_metadata(context, metadata)


def _diff_kinds(registry: AdapterRegistry) -> set[tuple[str, str]]:
    """(what, table) of each difference from the Table definitions."""
    kinds = set()
    for change in _schema_diff(registry):
        op = change[0] if isinstance(change, list) else change
        kinds.add((op[0], op[2] if op[0].startswith("modify") else op[1].table.name))
    return kinds


# What a SQLite file from before Alembic keeps: its primary keys were declared without NOT NULL, and its
# foreign keys are not DEFERRABLE (the registry defers them with PRAGMA defer_foreign_keys on SQLite).
ADOPTED_FILE_DIFF = {
    ("modify_nullable", "adapters"),
    ("modify_nullable", "versions"),
    *((op, table) for op in ("add_fk", "remove_fk") for table in ("aliases", "health")),
}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_alembic_head_is_what_the_tables_define(tmp_path: Path, request: pytest.FixtureRequest, backend: str) -> None:
    url = None if backend == "sqlite" else request.getfixturevalue("postgres_url")
    registry = AdapterRegistry(tmp_path, url=url)
    assert _revisions(registry) == [migrations.head()]
    assert _schema_diff(registry) == []
    registry.close()


# The tables as PRAGMA user_version 2 (the last schema before Alembic) created them.
_V2_SCHEMA = """
CREATE TABLE adapters (name TEXT PRIMARY KEY, created_at REAL NOT NULL, tenant TEXT);
CREATE TABLE versions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL REFERENCES adapters(name), digest TEXT NOT NULL,
    base_model TEXT NOT NULL, rank INTEGER NOT NULL, alpha REAL NOT NULL, target_modules TEXT NOT NULL,
    size_bytes INTEGER NOT NULL, created_at REAL NOT NULL, source TEXT NOT NULL, tags TEXT NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0, legacy_digest INTEGER NOT NULL DEFAULT 0, UNIQUE (name, digest)
);
CREATE TABLE aliases (
    name TEXT NOT NULL, alias TEXT NOT NULL, digest TEXT NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (name, alias), FOREIGN KEY (name, digest) REFERENCES versions(name, digest)
);
CREATE TABLE health (
    name TEXT NOT NULL, digest TEXT NOT NULL, state TEXT NOT NULL, reason TEXT, checked_at REAL, latency_s REAL,
    PRIMARY KEY (name, digest), FOREIGN KEY (name, digest) REFERENCES versions(name, digest) ON DELETE CASCADE
);
INSERT INTO adapters VALUES ('code', 1.0, 'acme');
INSERT INTO versions (name, digest, base_model, rank, alpha, target_modules, size_bytes, created_at, source, tags)
    VALUES ('code', '%s', 'base', 8, 16.0, '["q_proj"]', 10, 1.0, 's', '{}');
INSERT INTO aliases VALUES ('code', 'latest', '%s', 1.0);
PRAGMA user_version = 2;
""" % ((digest("v2"),) * 2)


def test_a_schema_2_file_is_stamped_at_revision_1_and_kept(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        conn.executescript(_V2_SCHEMA)
    registry = AdapterRegistry(tmp_path)
    assert _revisions(registry) == [migrations.head()] == [migrations.FIRST_REVISION]
    assert (registry.owner("code"), registry.get("code").version) == ("acme", digest("v2"))
    assert _diff_kinds(registry) == ADOPTED_FILE_DIFF
    registry.register("code", digest("new"), META, source="s", tenant="acme")
    registry.close()


def test_a_schema_1_file_is_upgraded_then_stamped(tmp_path: Path) -> None:
    write_v1_registry(tmp_path, [("code", digest("c1"), "s", {"tenant": "acme"})])
    registry = AdapterRegistry(tmp_path)
    assert registry.owner("code") == "acme" and registry.legacy_digests() == [digest("c1")]
    assert _revisions(registry) == [migrations.head()] and _diff_kinds(registry) == ADOPTED_FILE_DIFF
    registry.close()
    again = AdapterRegistry(tmp_path)  # reopening changes nothing
    assert again.owner("code") == "acme" and _revisions(again) == [migrations.head()]
    again.close()


def test_a_newer_file_is_refused(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path)
    with registry._db.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'f00d'")
    registry.close()
    with pytest.raises(RuntimeError, match="newer than this version of loraserve understands"):
        AdapterRegistry(tmp_path)


# -- change notices ------------------------------------------------------------------------------------


MARK = "tests_heard_up_to_here"
"""The listener's own channel: its notice, sent after a write returned, comes after everything the write sent."""


@pytest.fixture
def listener(postgres_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        conn.execute(f"LISTEN {MARK}")
        yield conn


def _heard(conn: psycopg.Connection) -> list[str]:
    """The names notified since the last call, up to a notice the listener sends itself now.

    PostgreSQL delivers notices in the order their transactions committed, and the listener's commits after
    every write that has returned: what those writes sent has arrived before it, and nothing of theirs comes
    after it. So no wait for notices that might still come (0.5-1 s after each write, before)."""
    conn.execute(f"NOTIFY {MARK}")
    names = []
    for notice in conn.notifies(timeout=30):
        if notice.channel == MARK:
            return names
        if notice.channel == NOTIFY_CHANNEL:
            names.append(notice.payload)
    raise AssertionError("the listener's own notice did not come back within 30 s")


def test_every_committed_write_notifies_its_names(pg_registry: AdapterRegistry, listener: psycopg.Connection) -> None:
    one, two = digest("one"), digest("two")
    writes = [
        (lambda: pg_registry.register("code", one, META, source="s"), ["code"]),
        (lambda: pg_registry.register("code", two, META, source="s"), ["code"]),
        (lambda: pg_registry.register("other", one, META, source="s"), ["other"]),
        (lambda: pg_registry.set_alias("code", "stable", one), ["code"]),
        (lambda: pg_registry.set_pinned("code@stable", True), ["code"]),
        (lambda: pg_registry.set_pinned("code@stable", False), ["code"]),
        (lambda: pg_registry.record_health("code", two, "ok"), ["code"]),
        (lambda: pg_registry.remove_alias("code", "stable"), ["code"]),
        (lambda: pg_registry.delete(f"code@{two}"), ["code"]),
        (lambda: pg_registry.rekey(one, digest("new"), move=lambda: None), ["code", "other"]),
    ]
    for write, names in writes:
        write()
        assert sorted(_heard(listener)) == names


def test_a_rolled_back_write_notifies_nobody(pg_registry: AdapterRegistry, listener: psycopg.Connection) -> None:
    pg_registry.register("code", digest("one"), META, source="s", tenant="a")
    assert _heard(listener) == ["code"]

    def fail() -> None:
        raise OSError("disk full")

    refused = [
        (lambda: pg_registry.register("code", digest("two"), META, source="s", tenant="b"), OwnershipConflict),
        (lambda: pg_registry.set_alias("code", "stable", "latest", expected=digest("x")), VersionConflict),
        (lambda: pg_registry.rekey(digest("one"), digest("new"), move=fail), OSError),
    ]
    for write, error in refused:
        with pytest.raises(error):
            write()
        assert _heard(listener) == []


# -- outages ---------------------------------------------------------------------------------------------


def test_an_outage_fails_fast_and_the_same_registry_recovers(
    pg_registry: AdapterRegistry, postgres: PostgresCluster, tmp_path: Path, postgres_url: str
) -> None:
    pg_registry.register("code", digest("one"), META, source="s")
    postgres.stop()
    try:
        calls = [
            lambda: pg_registry.get("code"),
            lambda: pg_registry.register("code", digest("two"), META, source="s"),
            lambda: AdapterRegistry(tmp_path, url=postgres_url),
        ]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(RegistryUnavailable) as info:
                call()
            assert time.monotonic() - started < CONNECT_TIMEOUT_S + 2
            message = info.value.message
            assert f"127.0.0.1:{postgres.port}/{postgres_url.rsplit('/', 1)[1]}" in message
            assert PASSWORD not in message and "PGPASSWORD" in message
            assert info.value.__cause__ is not None
    finally:
        postgres.start()
    assert pg_registry.get("code").version == digest("one")  # no restart: the pool reconnects
    pg_registry.register("code", digest("two"), META, source="s")
    assert pg_registry.get("code").version == digest("two")


def test_the_url_never_shows_the_password(pg_registry: AdapterRegistry) -> None:
    assert PASSWORD not in repr(pg_registry.url) and PASSWORD not in str(pg_registry.url)
    assert pg_registry.url.drivername == "postgresql+psycopg" and pg_registry.path is None


# -- the store.registry setting -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["postgresql://loraserve@postgres:5432/loraserve", "postgresql+psycopg://u@h/db", "sqlite:////x/r.db"]
)
def test_registry_urls_accepted(url: str) -> None:
    assert StoreSettings(root="/x", registry=url).registry == url


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("postgresql://u:hunter2@h/db", "PGPASSWORD"),
        ("mysql://u@h/db", "neither postgresql://"),
        ("postgresql+asyncpg://u@h/db", "neither postgresql://"),
        ("postgres://u@h/db", "neither postgresql://"),
        ("postgresql://u@h", "must name a host and a database"),
        ("sqlite://", "must name a file"),
        ("not a url", "is not a URL"),
    ],
)
def test_registry_urls_refused(url: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        StoreSettings(root="/x", registry=url)
    assert fragment in str(info.value)
    assert "hunter2" not in str(info.value).split("[type=")[0]  # our message masks it (pydantic echoes the input)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", TCP_TIMEOUTS),
        ("?keepalives_idle=7&tcp_user_timeout=9000", {**TCP_TIMEOUTS, "keepalives_idle": 7, "tcp_user_timeout": 9000}),
    ],
    ids=["defaults", "the-url-wins"],
)
def test_request_connections_carry_tcp_timeouts_that_bound_a_dropped_network(
    tmp_path: Path, postgres_url: str, query: str, expected: dict[str, int]
) -> None:
    """Read back from the kernel: a network that drops packets fails a query within seconds, not minutes.

    (Dropping packets needs root, so the drop itself is not staged here; the listener's deadline, which
    needs no help from TCP, is tested against a frozen proxy in test_changes.py.)"""
    registry = AdapterRegistry(tmp_path, url=postgres_url + query)
    try:
        with registry._db.engine.connect() as conn, socket.socket(fileno=os.dup(conn.connection.fileno())) as sock:
            options = {
                "keepalives": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                "keepalives_idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                "keepalives_interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                "keepalives_count": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                "tcp_user_timeout": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
            }
        assert options == expected
    finally:
        registry.close()
