"""The PostgreSQL change feed on a real cluster: a lost listener, the safety net, and an outage.

What both feeds share (a change within 1 s, per-name invalidation, rolled-back writes, the commit race) is
table-driven in test_catalog.py, on the same one-table registries used here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from adapter_store import RegistryUnavailable
from adapter_store.changes import LISTENER_NAME, PostgresChanges, SqliteChanges, open_changes
from tests.adapter_store.test_catalog import PostgresTable, _entry, within
from tests.postgres import PostgresCluster

# (the registry given a directory; the feed it gets; the URL libpq is given)
FACTORY = {
    "path": (lambda root: root / "registry.sqlite3", SqliteChanges, None),
    "path-string": (lambda root: f"{root}/registry.sqlite3", SqliteChanges, None),
    "sqlite-url": (lambda root: f"sqlite:///{root}/registry.sqlite3", SqliteChanges, None),
    "postgresql-url": (lambda root: "postgresql://u@127.0.0.1:1/db", PostgresChanges, "postgresql://u@127.0.0.1:1/db"),
    "sqlalchemy-url": (
        lambda root: "postgresql+psycopg://u@127.0.0.1:1/db",
        PostgresChanges,
        "postgresql://u@127.0.0.1:1/db",
    ),
}


@pytest.mark.parametrize(("registry", "feed", "libpq_url"), FACTORY.values(), ids=FACTORY.keys())
def test_the_registry_url_chooses_the_feed(
    tmp_path: Path, registry: Callable[[Path], str | Path], feed: type, libpq_url: str | None
) -> None:
    changes = open_changes(registry(tmp_path), refresh_s=5.0, busy_timeout_s=1.0)
    assert type(changes) is feed
    if isinstance(changes, PostgresChanges):
        assert changes._url == libpq_url  # nothing listens on port 1: it is in an outage
    else:
        assert (tmp_path / "registry.sqlite3").exists()  # the file it was given, not one named after the URL
    changes.close()


def test_an_unknown_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="neither a PostgreSQL URL nor an SQLite path"):
        open_changes("mysql://db/registry", refresh_s=5.0, busy_timeout_s=1.0)


@pytest.fixture
def table(postgres_url: str, request: pytest.FixtureRequest) -> Iterator[PostgresTable]:
    made = PostgresTable(postgres_url, refresh_s=getattr(request, "param", 600.0))
    for name in ("code", "legal"):
        made.write(name, "acme")
    made.settle()
    yield made
    made.changes.close()
    made.close()


def _kill_listener(url: str) -> int:
    """Terminate this database's listener backends (as a failover or an idle-connection reaper would); how many."""
    with psycopg.connect(url, autocommit=True) as conn:
        pids = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()",
            (LISTENER_NAME,),
        ).fetchall()
        for (pid,) in pids:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    return len(pids)


def test_a_lost_listener_reconnects_and_makes_everything_stale(table: PostgresTable) -> None:
    catalog = table.catalog()
    catalog.load("code")
    catalog.load("legal")
    assert _kill_listener(table.url) == 1
    within(1.0, lambda: catalog.get("code") is None and catalog.get("legal") is None)  # notifies were missed
    table.settle()  # listening again: a notification reaches it
    assert table.changes.outage is None  # reconnected at once: no outage, nothing refused meanwhile
    catalog.load("code")
    table.write("code", "hospital")
    within(1.0, lambda: catalog.get("code") is None)
    catalog.close()


def test_a_change_committed_while_the_listener_reconnects_is_not_missed(
    table: PostgresTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held between losing its connection and listening again, the feed must treat everything as stale both
    during that gap and once it listens again: what was committed meanwhile was never notified."""
    catalog = table.catalog()
    catalog.load("code")
    gate = threading.Event()
    reconnect = table.changes._connect  # white-box: the only way to hold the gap open long enough to act in it

    def held_reconnect() -> psycopg.Connection:
        gate.wait(10.0)
        return reconnect()

    monkeypatch.setattr(table.changes, "_connect", held_reconnect)
    assert _kill_listener(table.url) == 1
    within(1.0, lambda: catalog.get("code") is None)  # stale as soon as the connection is lost
    catalog.load("code")  # read in the gap, then changed in it: no notification reaches anyone
    table.write("code", "hospital")
    gate.set()
    within(1.0, lambda: catalog.get("code") is None)  # listening again: everything is read again
    assert catalog.load("code") == _entry("code", "hospital")
    catalog.close()


@pytest.mark.parametrize("table", [0.3], indirect=True, ids=["refresh_s=0.3"])
def test_a_change_made_without_a_notify_is_seen_after_refresh_s(table: PostgresTable) -> None:
    catalog = table.catalog()
    catalog.load("code")
    table.write("code", "hospital", notify=False)
    table.settle()
    waited = within(0.3 + 1.0, lambda: catalog.get("code") is None)
    assert catalog.load("code") == _entry("code", "hospital")
    assert waited > 0.0
    catalog.close()


def test_an_outage_serves_known_entries_refuses_unknown_names_fast_and_recovers(
    table: PostgresTable, postgres: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    catalog = table.catalog()
    known = catalog.load("code")
    postgres.stop()
    try:
        within(10.0, lambda: table.changes.outage is not None)
        with caplog.at_level(logging.WARNING, logger="adapter_store.catalog"):
            for _ in range(3):
                assert catalog.get("code") == known  # stale (everything is, once the listener is lost), served
        assert len([r for r in caplog.records if r.name == "adapter_store.catalog"]) == 1  # once per outage
        snapshots = table.snapshots
        for name in ("legal", "code"):  # never read, and known but stale: neither tries the database
            started = time.monotonic()
            with pytest.raises(RegistryUnavailable):
                catalog.load(name)
            assert time.monotonic() - started < 0.2  # microseconds in fact; the count above is the proof
        assert table.snapshots == snapshots
    finally:
        postgres.start()
    within(5.0, lambda: table.changes.outage is None)
    assert catalog.get("code") is None  # read again: changes made during the outage were never notified
    assert catalog.load("legal") == _entry("legal", "acme")
    table.write("legal", "hospital")
    within(1.0, lambda: catalog.get("legal") is None)
    catalog.close()
