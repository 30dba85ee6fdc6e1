"""The PostgreSQL change feed on a real cluster: a lost listener, the safety net, an outage, and the fleet's
engine events (strict parsing of an untrusted channel, the hand-over to subscribers, lost events).

What both feeds share (a change within 1 s, per-name invalidation, rolled-back writes, the commit race) is
table-driven in test_catalog.py, on the same one-table registries used here.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

import adapter_store.changes
from adapter_store import AdapterRef, AdapterStore, EngineEvent, RegistryUnavailable
from adapter_store.catalog import Catalog, CatalogEntry
from adapter_store.changes import (
    BACKOFF_S,
    CHANNEL,
    CONNECT_TIMEOUT_S,
    ENGINE_CHANNEL,
    LISTENER_NAME,
    MAX_EVENT_BYTES,
    PostgresChanges,
    SqliteChanges,
    open_changes,
)
from tests.adapter_store.frozen_proxy import FrozenProxy
from tests.adapter_store.helpers import write_adapter
from tests.adapter_store.test_catalog import PostgresTable, _entry, within
from tests.adapter_store.test_store import open_store
from tests.postgres import PASSWORD, PostgresCluster

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


def test_an_outage_serves_what_was_last_known_refuses_other_names_fast_and_recovers(
    table: PostgresTable, postgres: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    catalog = table.catalog()
    never_listed = Catalog(table.snapshot, table.changes, snapshot_all=table.snapshot_all)
    listing = catalog.listing()  # code and legal: acme
    table.write("code", "hospital")
    table.settle()
    assert catalog.load("code") == _entry("code", "hospital")  # read after the listing: the newer knowledge
    table.write("medical", "hospital")  # registered after the last listing, never read here
    table.settle()
    postgres.stop()
    try:
        within(10.0, lambda: table.changes.outage is not None)
        snapshots, listings = table.snapshots, table.listings
        with caplog.at_level(logging.WARNING, logger="adapter_store.catalog"):
            for _ in range(3):
                assert catalog.get("code") == _entry("code", "hospital")  # stale (all is, once the listener is lost)
                assert catalog.get("legal") == _entry("legal", "acme")  # never read by name: the listing's
        assert len([r for r in caplog.records if r.name == "adapter_store.catalog"]) == 1  # once per outage
        assert catalog.load("legal") == _entry("legal", "acme")
        assert catalog.load("code", may_use=lambda owner: owner == "hospital") == _entry("code", "hospital")
        assert catalog.listing() is listing  # /v1/models answers from it
        refusals = []
        for name, may_use in (("medical", None), ("nobody", None), ("legal", lambda owner: owner == "hospital")):
            started = time.monotonic()
            with pytest.raises(RegistryUnavailable) as refused:
                catalog.load(name, may_use)
            assert time.monotonic() - started < 0.2  # microseconds in fact; the counts below are the proof
            refusals.append(refused.value.message)
        assert len(set(refusals)) == 1  # another tenant's name is refused exactly as an unknown one
        with pytest.raises(RegistryUnavailable):
            never_listed.listing()
        assert (table.snapshots, table.listings) == (snapshots, listings)  # nothing tried the database
    finally:
        postgres.start()
    within(5.0, lambda: table.changes.outage is None)
    assert catalog.get("code") is None  # read again: changes made during the outage were never notified
    assert catalog.load("medical") == _entry("medical", "hospital")
    table.write("legal", "hospital")
    within(1.0, lambda: catalog.get("legal") is None)
    catalog.close()


def test_an_outage_the_feed_has_not_noticed_yet_serves_what_was_last_known(table: PostgresTable) -> None:
    """A read that fails before the listener has seen the outage (a silently cut network) falls back too."""
    catalog = table.catalog()
    catalog.listing()

    def unreachable(name: str) -> CatalogEntry | None:
        raise RegistryUnavailable("The adapter registry database cannot be reached (timeout expired).")

    catalog._snapshot = unreachable
    assert table.changes.outage is None
    assert catalog.load("code") == _entry("code", "acme")
    with pytest.raises(RegistryUnavailable, match="timeout expired"):
        catalog.load("code", may_use=lambda owner: owner is None)
    with pytest.raises(RegistryUnavailable, match="timeout expired"):
        catalog.load("nobody")
    catalog.close()


# -- engine events: the fleet's unloads and pins -------------------------------------------------------------

DIGEST = "ab" * 32
REPLICA = "0123456789abcdef" * 2
VALID = {"kind": "unload", "name": "code", "version": DIGEST, "replica": REPLICA}


def _payload(**changes: object) -> str:
    return json.dumps(VALID | changes)


# payload -> what the ValueError says
BAD_PAYLOADS = {
    "oversized": (json.dumps(VALID | {"pad": "x" * MAX_EVENT_BYTES}), "over 512"),
    "not-json": ("{kind: unload", "not JSON"),
    "empty": ("", "not JSON"),
    "a-list": (json.dumps([VALID]), "exactly"),
    "missing-field": (json.dumps({k: v for k, v in VALID.items() if k != "replica"}), "exactly"),
    "extra-field": (_payload(tenant="acme"), "exactly"),
    "unknown-kind": (_payload(kind="delete_everything"), "unknown engine event kind"),
    "kind-not-a-string": (_payload(kind=["unload"]), "unknown engine event kind"),
    "name-traversal": (_payload(name="../etc"), "adapter name"),
    "name-too-long": (_payload(name="a" * 65), "adapter name"),
    "name-not-a-string": (_payload(name=7), "adapter name"),
    "version-prefix": (_payload(version=DIGEST[:16]), "version"),
    "version-upper-case": (_payload(version=DIGEST.upper()), "version"),
    "version-newline": (_payload(version=DIGEST + "\n"), "version"),
    "replica-not-hex": (_payload(replica="z" * 32), "replica"),
    "replica-null": (_payload(replica=None), "replica"),
}


@pytest.mark.parametrize(("payload", "says"), BAD_PAYLOADS.values(), ids=BAD_PAYLOADS.keys())
def test_an_engine_event_payload_is_parsed_strictly(payload: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        EngineEvent.parse(payload)


@pytest.mark.parametrize("kind", ["unload", "preload"])
def test_an_engine_event_survives_its_encoding(kind: str) -> None:
    event = EngineEvent(kind, "code.v2_x-1", DIGEST, REPLICA)  # type: ignore[arg-type]
    assert EngineEvent.parse(event.encode()) == event
    assert len(event.encode().encode()) < MAX_EVENT_BYTES // 2  # the bound leaves room: no real event nears it


def _notify(url: str, channel: str, payload: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


class Heard:
    """A subscriber that keeps what the feed hands it (on the feed's thread)."""

    def __init__(self) -> None:
        self.events: list[EngineEvent] = []
        self.missed = 0

    def on_event(self, event: EngineEvent) -> None:
        self.events.append(event)

    def on_missed(self) -> None:
        self.missed += 1


def test_engine_events_reach_subscribers_and_bad_ones_are_dropped(
    table: PostgresTable, caplog: pytest.LogCaptureFixture
) -> None:
    heard = Heard()
    table.changes.subscribe(heard.on_event, heard.on_missed)
    catalog = table.catalog()
    catalog.load("code")
    with caplog.at_level(logging.WARNING, logger="adapter_store.changes"):
        for payload, _ in BAD_PAYLOADS.values():
            _notify(table.url, ENGINE_CHANNEL, payload)
        _notify(table.url, ENGINE_CHANNEL, _payload(kind="preload"))
        within(1.0, lambda: heard.events)
    assert heard.events == [EngineEvent("preload", "code", DIGEST, REPLICA)]
    dropped = [r for r in caplog.records if "dropped an invalid engine event" in r.getMessage()]
    assert len(dropped) == len(BAD_PAYLOADS)
    assert catalog.get("code") is not None  # an engine event is no registry change
    table.write("code", "hospital")  # and the listener still hears those
    within(1.0, lambda: catalog.get("code") is None)
    assert heard.missed == 0
    catalog.close()


def test_a_failing_subscriber_neither_stops_the_listener_nor_the_others(
    table: PostgresTable, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: EngineEvent) -> None:
        raise RuntimeError("event loop closed")

    heard = Heard()
    table.changes.subscribe(broken, heard.on_missed)
    table.changes.subscribe(heard.on_event, heard.on_missed)
    with caplog.at_level(logging.ERROR, logger="adapter_store.changes"):
        for kind in ("preload", "unload"):
            _notify(table.url, ENGINE_CHANNEL, _payload(kind=kind))
        within(1.0, lambda: len(heard.events) == 2)
    assert [e.kind for e in heard.events] == ["preload", "unload"]
    assert len([r for r in caplog.records if "subscriber failed" in r.getMessage()]) == 2
    catalog = table.catalog()
    catalog.load("code")
    table.write("code", "hospital")
    within(1.0, lambda: catalog.get("code") is None)
    catalog.close()


def test_subscribers_hear_when_events_may_have_been_lost(table: PostgresTable) -> None:
    heard = Heard()
    table.changes.subscribe(heard.on_event, heard.on_missed)
    assert _kill_listener(table.url) == 1
    within(1.0, lambda: heard.missed == 1)  # it listens again: whatever was sent meanwhile is gone
    _notify(table.url, ENGINE_CHANNEL, _payload())
    within(1.0, lambda: heard.events)
    assert heard.missed == 1


def _store_on(url: str, tmp_path: Path) -> AdapterStore:
    return open_store(tmp_path, registry=url.replace(f":{PASSWORD}@", "@"))  # the password: from PGPASSWORD


def test_a_store_publishes_to_the_other_replicas_and_skips_its_own(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    a, b = _store_on(postgres_url, tmp_path / "a"), _store_on(postgres_url, tmp_path / "b")
    version = a.register(str(write_adapter(tmp_path / "a" / "volume" / "code", seed=1)), "code")
    heard = {replica: Heard() for replica in ("a", "b")}
    for replica, store in (("a", a), ("b", b)):
        store.subscribe(heard[replica].on_event, heard[replica].on_missed)
    # both listening: an event sent before a replica's LISTEN is lost (by design: on_missed covers it)
    within(5.0, lambda: a._changes.stamp_any() > 0 and b._changes.stamp_any() > 0)
    assert a.replica != b.replica
    a.publish_engine_event("unload", version)
    b.publish_engine_event("preload", version)
    within(1.0, lambda: heard["a"].events and heard["b"].events)
    time.sleep(0.2)  # an own event would have arrived by now too
    assert heard["b"].events == [EngineEvent("unload", "code", version.version, a.replica)]
    assert heard["a"].events == [EngineEvent("preload", "code", version.version, b.replica)]
    a.close()
    b.close()


def test_on_sqlite_publishing_sends_nothing_and_subscribers_are_never_called(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    version = store.register(str(write_adapter(tmp_path / "volume" / "code", seed=1)), "code")
    heard = Heard()
    store.subscribe(heard.on_event, heard.on_missed)
    store.publish_engine_event("unload", version)  # one process: the caller acted on its own engine already
    time.sleep(0.2)
    assert (heard.events, heard.missed) == ([], 0)
    store.close()


# -- a registry that stops answering (packets dropped, a hung server) -----------------------------------------


@pytest.fixture
def heartbeat(monkeypatch: pytest.MonkeyPatch) -> tuple[float, float]:
    """The listener's heartbeat period and deadline, 0.15 s and 0.6 s here instead of 1 s and 2 s: the same
    mechanism (a round trip on a timer, the connection cut at its deadline), and ~3 s less per test, most of
    it waiting for the deadline (0.3 s and 1 s took 1.75 s a test, 0.15 and 0.6 s ~1 s). 0.6 s still leaves a
    loaded machine's ``SELECT 1`` on localhost ample time."""
    monkeypatch.setattr(adapter_store.changes, "HEARTBEAT_S", 0.15)
    monkeypatch.setattr(adapter_store.changes, "HEARTBEAT_TIMEOUT_S", 0.6)
    return 0.15, 0.6


def test_a_registry_that_stops_answering_is_an_outage_within_seconds_and_the_listener_reconnects(
    postgres_url: str, heartbeat: tuple[float, float]
) -> None:
    """Nothing closes: only the listener's heartbeat deadline can tell (see tests/adapter_store/frozen_proxy.py)."""
    every, deadline = heartbeat
    proxy = FrozenProxy(postgres_url)
    changes = PostgresChanges(proxy.url, refresh_s=600.0)
    try:
        within(5.0, lambda: changes.stamp_any() > 0)  # listening: its first LISTEN makes everything stale
        time.sleep(every * 1.5)  # a heartbeat answered: one that is not is what counts
        assert changes.outage is None
        proxy.freeze()
        waited = within(every + deadline + 2.0, lambda: changes.outage is not None)
        proxy.thaw()
        within(CONNECT_TIMEOUT_S + BACKOFF_S[1] + 2.0, lambda: changes.outage is None)
        before = changes.stamp("code")
        _notify(postgres_url, CHANNEL, "code")  # listening again, on a new connection
        within(1.0, lambda: changes.stamp("code") != before)
        print(f"\nfrozen registry: an outage {waited:.2f} s after it stopped answering")
    finally:
        proxy.thaw()
        changes.close()
        proxy.close()


def test_a_store_refuses_registry_calls_at_once_while_the_registry_does_not_answer_and_keeps_serving(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch, heartbeat: tuple[float, float]
) -> None:
    every, deadline = heartbeat
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    proxy = FrozenProxy(postgres_url)
    store = _store_on(proxy.url, tmp_path)
    pool = ThreadPoolExecutor(2)  # a call that waits on the frozen database fails the test rather than hang it
    try:
        version = store.register(str(write_adapter(tmp_path / "volume" / "code", seed=1)), "code")
        within(5.0, lambda: any(e.name == "code" for e in store.entries()))
        time.sleep(every * 1.5)
        proxy.freeze()
        within(every + deadline + 2.0, lambda: store._changes.outage is not None)
        for admin in (lambda: store.pin("code"), lambda: store.set_alias("code", "stable", version.version)):
            with pytest.raises(RegistryUnavailable, match="stopped answering"):
                pool.submit(admin).result(timeout=0.5)  # no connection attempt: at once
        assert store.entry("code").resolve(AdapterRef.parse("code")) == version  # served as last known
        proxy.thaw()
        within(CONNECT_TIMEOUT_S + BACKOFF_S[1] + 2.0, lambda: store._changes.outage is None)
        assert store.pin("code").pinned
    finally:
        proxy.thaw()
        pool.shutdown()
        store.close()
        proxy.close()
