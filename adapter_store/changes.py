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

While the listener cannot reach the database, :attr:`Changes.outage` says so:
the catalog then keeps serving the entries it holds, and refuses names it
does not hold at once (``RegistryUnavailable``) instead of letting each
request wait for a connection attempt to fail.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

logger = logging.getLogger(__name__)

CHANNEL = "loraserve_registry"
"""The PostgreSQL notification channel the registry's write transactions notify (payload: the adapter name)."""
EVERYTHING = "*"
"""The payload that makes every name stale (an empty payload does too: an operator's plain ``NOTIFY``)."""
LISTENER_NAME = "loraserve-registry-listener"
"""The listener connection's ``application_name``: how it shows in ``pg_stat_activity``."""

POLL_S = 0.2  # how often the listener stops waiting for notifications, to see close() and the safety net
BACKOFF_S = (0.05, 1.0)  # reconnect delays, doubling from the first to the last: back within 1 s of the database
CONNECT_TIMEOUT_S = 2  # libpq's smallest connect_timeout
# Without keepalives a silently cut network leaves the listener waiting forever on a dead socket.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 1, "keepalives_count": 3}


class Changes(ABC):
    """A registry's change feed: a stamp per name that moves whenever the name may have changed."""

    @abstractmethod
    def stamp(self, name: str) -> int:
        """A number that moves whenever ``name``'s rows may have changed since it was taken. Never blocks on I/O."""

    @abstractmethod
    def stamp_any(self) -> int:
        """A number that moves whenever any name's rows may have changed (the listing of every adapter)."""

    @property
    def outage(self) -> int | None:
        """The number of the current registry outage (counting from 1), ``None`` while it is reachable."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Release the feed's connection (and stop its thread)."""


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


class PostgresChanges(Changes):
    """LISTEN on ``loraserve_registry`` in a daemon thread; each notification moves its name's stamp.

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
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registry-changes", daemon=True)
        self._thread.start()

    def stamp(self, name: str) -> int:
        with self._lock:
            return self._changed.get(name, self._everything)

    def stamp_any(self) -> int:
        with self._lock:
            return self._counter  # moved by every invalidation, of one name or of all

    @property
    def outage(self) -> int | None:
        return self._outage

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

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
            make_conninfo(self._url, **KEEPALIVES),
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT_S,
            application_name=LISTENER_NAME,
        )
        try:
            conn.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error:
            conn.close()
            raise
        # Anything committed before LISTEN took effect was not notified to us: read everything again.
        self.invalidate(EVERYTHING)
        if self._outage is not None:
            logger.warning("registry reachable again after outage %d; re-reading every adapter", self._outage)
        self._outage = None
        return conn

    def _unreachable(self, error: psycopg.Error) -> None:
        self.invalidate(EVERYTHING)
        if self._outage is None:
            self._outages += 1
            self._outage = self._outages
            logger.warning("registry unreachable (%s): serving adapters as last read until it is back", error)

    def _listen(self, conn: psycopg.Connection) -> None:
        """Invalidate per notification, and everything every ``refresh_s``, until closed or the connection fails."""
        refresh_at = time.monotonic() + self._refresh_s
        while not self._stop.is_set():
            for notification in conn.notifies(timeout=POLL_S):
                self.invalidate(notification.payload)
            if time.monotonic() >= refresh_at:  # the safety net: a write that sent no notify
                self.invalidate(EVERYTHING)
                refresh_at = time.monotonic() + self._refresh_s


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
