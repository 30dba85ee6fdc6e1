"""Has the registry changed? What the catalog asks before it serves an entry from memory.

The catalog (``adapter_store.catalog``) keeps each adapter name's registry rows
in memory so a request for a known adapter needs no registry I/O. It stamps
every entry with :meth:`Changes.stamp` taken *before* the entry was read, and
serves it only while the stamp has not moved; asking must be cheap and must
never block on I/O, because it happens on the event loop for every request.

Two feeds, one per registry backend (:func:`open_changes` picks by the
registry's path or URL):

* :class:`SqliteChanges`: ``PRAGMA data_version`` on a connection of its own
  moves whenever any other connection (this process or another) commits to
  the database file. Exact, and global: any commit makes every entry stale.
* :class:`PostgresChanges`: every registry write transaction on PostgreSQL
  calls ``pg_notify('loraserve_registry', <adapter name>)``, which is
  delivered when (and only if) it commits. A daemon thread LISTENs on its own
  connection and moves the stamp of the name notified (``*`` or an empty
  payload: every name), so a change through any replica reaches every other
  replica's catalog in milliseconds. Notifications sent while it is not
  listening are lost, so losing the connection makes everything stale, and
  so does connecting again; a periodic full invalidation (``store.refresh_s``)
  is the safety net for anything else (a write made without a notify).

The PostgreSQL listener also carries the fleet's *engine events*
(:class:`EngineEvent`, channel ``loraserve_engine``): an admin's unload (or
delete) and pin act on the replica that answered, which then publishes the
event so every other replica unloads that version from its engine, or preloads
the pinned version, within milliseconds. Payloads on the channel are
untrusted (anyone with the database's credentials can ``NOTIFY``): each is
bounded in size and parsed strictly, and a bad one is logged and dropped. A
subscriber (:meth:`Changes.subscribe`) is called on the listener's thread and
must only hand the event on (to an event loop, say); its errors are logged,
never let through to the listener. NOTIFY is not durable: an event sent while
a replica is not listening is lost, so every (re)connect calls the
subscriber's ``on_missed``, after which it reconciles what it can derive from
the registry (pinned versions it lacks are preloaded again). A missed unload
cannot be derived (the registry keeps no record of it): unload is best-effort
across the fleet, and the engine's LRU drops the version in time.

SQLite carries no engine events: it is one replica, whose admin calls act on
its own engine directly. Several servers on one SQLite file do see each
other's registry changes (aliases, pins' disk protection, new versions), but an
unload or a pin's preload acts only on the server that answered; a fleet runs
on PostgreSQL.

While the listener cannot reach the database, :attr:`Changes.outage` says so:
the catalog then keeps serving what it last knew, and the registry refuses
every call at once (``RegistryUnavailable``) instead of letting each request
wait for a connection attempt to fail. A database that stops answering
without closing anything (a network that drops packets, a hung server or
host) must count too, and a LISTEN connection is idle, so nothing it sends
would notice: the listener asks for one round trip every ``HEARTBEAT_S`` and
cuts the connection if no answer comes within ``HEARTBEAT_TIMEOUT_S`` (a
client-side deadline, which works whatever the peer's kernel still
acknowledges), which is an outage at once. Its socket also carries the
registry's TCP keepalive and user timeouts (``registry_db.TCP_TIMEOUTS``).
So a hung registry is an outage within about three seconds, and the listener
reconnects (``connect_timeout``) until it answers again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from adapter_store.errors import InvalidRef
from adapter_store.refs import check_name
from adapter_store.registry_db import timeouts

logger = logging.getLogger(__name__)

CHANNEL = "loraserve_registry"
"""The PostgreSQL notification channel the registry's write transactions notify (payload: the adapter name)."""
EVERYTHING = "*"
"""The payload that makes every name stale (an empty payload does too: an operator's plain ``NOTIFY``)."""
ENGINE_CHANNEL = "loraserve_engine"
"""The PostgreSQL notification channel of engine events (payload: :meth:`EngineEvent.encode`)."""
MAX_EVENT_BYTES = 512
"""The largest engine-event payload accepted (a real one is under 200 bytes); longer ones are dropped unparsed."""
LISTENER_NAME = "loraserve-registry-listener"
"""The listener connection's ``application_name``: how it shows in ``pg_stat_activity``."""

POLL_S = 0.2  # how often the listener stops waiting for notifications, to see close() and the safety net
BACKOFF_S = (0.05, 1.0)  # reconnect delays, doubling from the first to the last: back within 1 s of the database
CONNECT_TIMEOUT_S = 2  # libpq's smallest connect_timeout
HEARTBEAT_S = 1.0  # how often the idle listener asks the database for one round trip
HEARTBEAT_TIMEOUT_S = 2.0  # ... and how long it waits for the answer before it cuts the connection: an outage


EngineEventKind = Literal["unload", "preload"]
_DIGEST = re.compile(r"[0-9a-f]{64}")
_REPLICA = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class EngineEvent:
    """What an admin call did to one replica's engine, for every other replica to do too.

    ``unload``: drop ``name``'s version ``version`` from the engine (an unload
    or a delete). ``preload``: the version was pinned; load it now if it still
    is. ``replica`` is the sending store's id, so a replica skips its own events.
    """

    kind: EngineEventKind
    name: str
    version: str  # the full digest
    replica: str  # the sender's AdapterStore.replica

    def __post_init__(self) -> None:
        """Refuses anything but the exact shape (``ValueError``), whoever built it."""
        if self.kind not in get_args(EngineEventKind):
            raise ValueError(f"unknown engine event kind {self.kind!r}")
        try:
            check_name(self.name)
        except InvalidRef as e:
            raise ValueError(e.message) from e
        for field, pattern in (("version", _DIGEST), ("replica", _REPLICA)):
            value = getattr(self, field)
            if not isinstance(value, str) or not pattern.fullmatch(value):
                raise ValueError(f"engine event {field} {value!r} is not {pattern.pattern}")

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def parse(cls, payload: str) -> EngineEvent:
        """The event a channel payload carries; ``ValueError`` saying why for anything else."""
        if len(payload.encode()) > MAX_EVENT_BYTES:
            raise ValueError(f"payload of {len(payload.encode())} bytes, over {MAX_EVENT_BYTES}")
        try:
            fields = json.loads(payload)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON: {e}") from e
        expected = {"kind", "name", "version", "replica"}
        if not isinstance(fields, dict) or set(fields) != expected:
            keys = sorted(fields) if isinstance(fields, dict) else type(fields).__name__
            raise ValueError(f"expected an object with exactly {sorted(expected)}, got {keys}")
        return cls(**fields)


class Unanswered(psycopg.OperationalError):
    """The listener's heartbeat got no answer in time: the database stopped answering (its connection is cut)."""


OnEvent = Callable[[EngineEvent], None]
OnMissed = Callable[[], None]


class Changes(ABC):
    """A registry's change feed: a stamp per name that moves whenever the name may have changed."""

    @abstractmethod
    def stamp(self, name: str) -> int:
        """A number that moves whenever ``name``'s rows may have changed since it was taken. Never blocks on I/O."""

    @abstractmethod
    def stamp_any(self) -> int:
        """A number that moves whenever any name's rows may have changed (the listing of every adapter)."""

    def changed_since(self, stamp: int) -> frozenset[str] | None:
        """The names that may have changed since ``stamp_any()`` returned ``stamp``; ``None``: any name may have.

        A feed that does not tell names apart (SQLite's data version) always answers ``None``.
        """
        return None

    @property
    def outage(self) -> int | None:
        """The number of the current registry outage (counting from 1), ``None`` while it is reachable."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Release the feed's connection (and stop its thread)."""

    @abstractmethod
    def subscribe(self, on_event: OnEvent, on_missed: OnMissed) -> None:
        """Call ``on_event`` with every engine event, and ``on_missed`` whenever events may have been lost.

        Both run on the feed's own thread: they must only hand over (never block).
        """


class SqliteChanges(Changes):
    """SQLite's ``PRAGMA data_version``: moves on every commit by any other connection to the file.

    It reads the WAL index header in shared memory (no table page), on a
    connection of its own so no statement of ours moves it.
    """

    def __init__(self, db_path: Path, *, busy_timeout_s: float) -> None:
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(db_path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)

    def stamp(self, name: str) -> int:
        return self.stamp_any()  # global: any commit moves every name

    def stamp_any(self) -> int:
        with self._lock:
            return self._conn.execute("PRAGMA data_version").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def subscribe(self, on_event: OnEvent, on_missed: OnMissed) -> None:
        """Neither is ever called: on SQLite there is no other replica to hear from (see the module docstring)."""


class PostgresChanges(Changes):
    """LISTEN on ``loraserve_registry`` in a daemon thread; each notification moves its name's stamp.

    It LISTENs on ``loraserve_engine`` too and hands each valid engine event
    to the subscribers (see the module docstring).

    Stamps come from one counter: invalidating a name gives it the next value,
    invalidating everything gives that value to every name (so the per-name
    table is emptied and stays as small as the names changed since).
    """

    def __init__(self, url: str, *, refresh_s: float) -> None:
        self._url = url
        self._refresh_s = refresh_s
        self._lock = threading.Lock()
        self._counter = 0
        self._everything = 0  # the stamp of every name not in _changed
        self._changed: dict[str, int] = {}
        self._outages = 0
        self._outage: int | None = None
        self._subscribers: list[tuple[OnEvent, OnMissed]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registry-changes", daemon=True)
        self._thread.start()

    def stamp(self, name: str) -> int:
        with self._lock:
            return self._changed.get(name, self._everything)

    def stamp_any(self) -> int:
        with self._lock:
            return self._counter  # moved by every invalidation, of one name or of all

    def changed_since(self, stamp: int) -> frozenset[str] | None:
        with self._lock:  # _changed holds the names changed since the last invalidation of everything
            if self._everything > stamp:
                return None
            return frozenset(name for name, moved in self._changed.items() if moved > stamp)

    @property
    def outage(self) -> int | None:
        return self._outage

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def subscribe(self, on_event: OnEvent, on_missed: OnMissed) -> None:
        with self._lock:
            self._subscribers.append((on_event, on_missed))

    def _hand_over(self, call: Callable[[OnEvent, OnMissed], None]) -> None:
        """Call each subscriber; its errors are logged: the listener must never stop for a subscriber's bug."""
        with self._lock:
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            try:
                call(*subscriber)
            except Exception:
                logger.exception("an engine-event subscriber failed; the event is dropped for it")

    def _engine_event(self, payload: str) -> None:
        try:
            event = EngineEvent.parse(payload)
        except (ValueError, TypeError) as e:
            logger.warning("dropped an invalid engine event on %s (%s): %r", ENGINE_CHANNEL, e, payload[:100])
            return
        self._hand_over(lambda on_event, _: on_event(event))

    def invalidate(self, name: str) -> None:
        """Make ``name`` stale (``*`` or ``""``: every name)."""
        with self._lock:
            self._counter += 1
            if name in (EVERYTHING, ""):
                self._everything = self._counter
                self._changed.clear()
            else:
                self._changed[name] = self._counter

    def _run(self) -> None:
        delay = BACKOFF_S[0]
        while not self._stop.is_set():
            try:
                conn = self._connect()
            except psycopg.Error as e:  # only a failed connect is an outage
                self._unreachable(e)
            else:
                connected_at = time.monotonic()
                try:
                    with conn:
                        self._listen(conn)
                    return  # closed
                except Unanswered as e:  # it stopped answering: an outage now, not after a connect timeout
                    self._unreachable(e)
                except Exception as e:  # anything but close: never leave the catalog without a feed
                    self.invalidate(EVERYTHING)  # whatever is notified until it listens again is missed
                    unexpected = not isinstance(e, psycopg.Error)
                    logger.warning(
                        "registry change feed lost its connection (%s); reconnecting", e, exc_info=unexpected
                    )
                if time.monotonic() - connected_at > BACKOFF_S[1]:
                    delay = BACKOFF_S[0]  # it held a while: a new failure, not a connection that keeps dropping
            self._stop.wait(delay)
            delay = min(delay * 2, BACKOFF_S[1])

    def _connect(self) -> psycopg.Connection:
        """A listening connection; everything is stale once it listens, and an outage is over."""
        conn = psycopg.connect(
            make_conninfo(self._url, **timeouts(conninfo_to_dict(self._url))),
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT_S,
            application_name=LISTENER_NAME,
        )
        try:
            conn.execute(f"LISTEN {CHANNEL}")
            conn.execute(f"LISTEN {ENGINE_CHANNEL}")
        except psycopg.Error:
            conn.close()
            raise
        # Anything committed before LISTEN took effect was not notified to us: read everything again.
        self.invalidate(EVERYTHING)
        if self._outage is not None:
            logger.warning("registry reachable again after outage %d; re-reading every adapter", self._outage)
        self._outage = None
        # Engine events sent while it did not listen are lost too: subscribers reconcile what they can.
        self._hand_over(lambda _, on_missed: on_missed())
        return conn

    def _unreachable(self, error: Exception) -> None:
        self.invalidate(EVERYTHING)
        if self._outage is None:
            self._outages += 1
            self._outage = self._outages
            logger.warning("registry unreachable (%s): serving adapters as last read until it is back", error)

    def _listen(self, conn: psycopg.Connection) -> None:
        """Invalidate per notification, and everything every ``refresh_s``, until closed or the connection fails."""
        refresh_at = time.monotonic() + self._refresh_s
        heartbeat_at = time.monotonic() + HEARTBEAT_S
        while not self._stop.is_set():
            for notification in conn.notifies(timeout=POLL_S):
                if notification.channel == ENGINE_CHANNEL:
                    self._engine_event(notification.payload)
                else:
                    self.invalidate(notification.payload)
            if time.monotonic() >= refresh_at:  # the safety net: a write that sent no notify
                self.invalidate(EVERYTHING)
                refresh_at = time.monotonic() + self._refresh_s
            if time.monotonic() >= heartbeat_at:
                self._heartbeat(conn)
                heartbeat_at = time.monotonic() + HEARTBEAT_S

    def _heartbeat(self, conn: psycopg.Connection) -> None:
        """One round trip within ``HEARTBEAT_TIMEOUT_S``, else the connection is cut and that is an outage
        (:class:`Unanswered`). Notifications that arrive meanwhile are kept for the next ``notifies()``."""
        lock = threading.Lock()
        done = cut = False

        def deadline() -> None:
            nonlocal cut
            with lock:
                if done:
                    return
                cut = True
                with socket.socket(fileno=os.dup(conn.fileno())) as sock:  # the read waiting on it ends
                    sock.shutdown(socket.SHUT_RDWR)

        watchdog = threading.Timer(HEARTBEAT_TIMEOUT_S, deadline)
        watchdog.daemon = True
        watchdog.start()
        failure: psycopg.Error | None = None
        try:
            conn.execute("SELECT 1")
        except psycopg.Error as e:
            failure = e
        with lock:
            done = True
        watchdog.cancel()
        if cut:  # even if the answer came as it was cut: the connection is gone, and late is unanswered
            raise Unanswered(f"no answer to a heartbeat within {HEARTBEAT_TIMEOUT_S:g} s") from failure
        if failure is not None:
            raise failure


POSTGRES_SCHEMES = ("postgresql", "postgres")


def open_changes(registry: str | Path, *, refresh_s: float, busy_timeout_s: float) -> Changes:
    """The change feed of a registry: a ``postgresql://`` URL (a SQLAlchemy ``+driver`` is allowed) gets
    :class:`PostgresChanges`, a file path (or ``sqlite:///path``) :class:`SqliteChanges`."""
    if isinstance(registry, Path):
        return SqliteChanges(registry, busy_timeout_s=busy_timeout_s)
    scheme, separator, rest = registry.partition("://")
    if not separator:
        return SqliteChanges(Path(registry), busy_timeout_s=busy_timeout_s)
    dialect = scheme.partition("+")[0]
    if dialect in POSTGRES_SCHEMES:
        return PostgresChanges(f"postgresql://{rest}", refresh_s=refresh_s)  # libpq knows no +driver
    if dialect == "sqlite" and rest.startswith("/"):
        return SqliteChanges(Path(rest[1:]), busy_timeout_s=busy_timeout_s)
    raise ValueError(f"registry {scheme}://... is neither a PostgreSQL URL nor an SQLite path")
