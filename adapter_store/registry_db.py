"""The registry's database: which one (SQLite file or PostgreSQL), its connections, locks and outages.

SQLite (the embedded default) is one file under the store root, in WAL mode so
readers never block the writer. pysqlite's own transaction handling would
begin a transaction only before the first write, so a read-then-write could
fail half-way with "database is locked"; SQLAlchemy's documented recipe turns
it off (``isolation_level = None``) and emits ``BEGIN`` itself from the
``begin`` event: ``BEGIN IMMEDIATE`` for a write transaction, so the write
lock is taken up front and concurrent writers (threads or processes) queue on
the busy timeout.

PostgreSQL (``postgresql://user@host:port/db``, password from libpq's
``PGPASSWORD``) serves a fleet of replicas. A write transaction first takes a
transaction-scoped advisory lock per adapter name it changes, so writes to one
name are serialized across every replica as SQLite's write lock serializes
them, and sends ``pg_notify(NOTIFY_CHANNEL, name)`` for each name before it
commits (delivered on commit only). Connections are checked before use
(``pool_pre_ping``) with a short connect timeout and TCP keepalive and user
timeouts (:data:`TCP_TIMEOUTS`): a dead database, or a network that drops its
packets, fails within seconds with :class:`RegistryUnavailable`, and one that
comes back is used again without a restart. While the change feed knows the
database is unreachable (:meth:`Database.fail_fast`), every call fails at once
without a connection attempt: admin calls get their 503 immediately, and none
waits on a connection to a database that stopped answering.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import URL, Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.exc import ArgumentError, DBAPIError

from adapter_store.errors import RegistryUnavailable

DB_NAME = "registry.sqlite3"
NOTIFY_CHANNEL = "loraserve_registry"  # payload: the name of an adapter a committed transaction changed
CONNECT_TIMEOUT_S = 3  # libpq's connect_timeout: an unreachable database fails within seconds
TCP_TIMEOUTS = {
    # libpq's TCP settings, so a network that drops packets (rather than refusing connections) fails within
    # seconds too; Linux's defaults would wait two hours (keepalive) and about fifteen minutes (retransmission)
    "keepalives": 1,
    "keepalives_idle": 2,  # seconds of silence before the first probe of an idle connection
    "keepalives_interval": 1,
    "keepalives_count": 2,  # probes unanswered: an idle connection to a vanished peer is dropped within ~4 s
    "tcp_user_timeout": 3000,  # ms sent data may stay unacknowledged: a query into a black hole fails in 3 s
}
NAME_LOCK_CLASS = 0x10A5  # advisory-lock key space of per-name write locks (key 2: hashtext(name))
UPGRADE_LOCK_CLASS = 0x10A6  # ... and of the schema upgrade when a replica opens the database
UPLOAD_LOCK_CLASS = 0x10A7  # ... and of keeping or discarding one upload's files (key 2: hashtext(uri))
_WRITE = "loraserve_write"  # execution option: this connection's transaction will write
_POOL = {"pool_size": 10, "max_overflow": 40}  # request threads share connections; writes are short


def parse_url(url: str) -> URL:
    """A registry URL as the engine needs it; ``ValueError`` (saying what is accepted) for anything else.

    ``postgresql://`` (or ``postgresql+psycopg://``) gets the psycopg 3 driver;
    ``sqlite:///path`` names a SQLite file. Other schemes and drivers are refused.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise ValueError(f"registry URL {mask(url)!r} is not a URL: {e}") from e
    if parsed.drivername in ("postgresql", "postgresql+psycopg"):
        if not parsed.host or not parsed.database:
            raise ValueError(
                f"registry URL {mask(url)!r} must name a host and a database: postgresql://user@host:5432/database"
            )
        return parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise ValueError(f"registry URL {url!r} must name a file: sqlite:////absolute/path/registry.sqlite3")
        return parsed
    raise ValueError(
        f"registry URL {mask(url)!r} is neither postgresql://user@host:port/database nor sqlite:///path "
        f"(scheme {parsed.drivername!r}); leave store.registry out for the SQLite file under store.root"
    )


def mask(url: str | URL) -> str:
    """The URL with any password replaced by ``***``, for messages and logs."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except ArgumentError:
        return "<unparseable URL>"
    return parsed.render_as_string(hide_password=True)


def create(url: URL, *, busy_timeout_s: float) -> Engine:
    """An engine for the registry at ``url`` (see the module docstring for what each backend gets)."""
    if url.get_backend_name() == "sqlite":
        Path(url.database or "").parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": busy_timeout_s, "check_same_thread": False}, **_POOL)
        event.listen(engine, "connect", _sqlite_setup(busy_timeout_s))
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True, connect_args=timeouts(url.query), **_POOL)


def timeouts(given: Mapping[str, object]) -> dict[str, Any]:
    """libpq's connection parameters that bound an unreachable database, except those ``given`` (a URL's query)
    sets: the operator's own win."""
    defaults = {"connect_timeout": CONNECT_TIMEOUT_S, **TCP_TIMEOUTS}
    return {key: value for key, value in defaults.items() if key not in given}


def _sqlite_setup(busy_timeout_s: float) -> Any:
    def setup(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        dbapi_connection.isolation_level = None  # pysqlite begins nothing; _sqlite_begin does
        dbapi_connection.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        _wal(dbapi_connection, time.monotonic() + busy_timeout_s)
        for pragma in ("synchronous = NORMAL", "foreign_keys = ON"):
            dbapi_connection.execute(f"PRAGMA {pragma}")

    return setup


def _wal(dbapi_connection: sqlite3.Connection, deadline: float) -> None:
    """Put the database in WAL mode, waiting for other connections up to ``deadline``.

    Why a loop: switching a database's journal mode takes an exclusive lock, and SQLite answers ``SQLITE_BUSY``
    at once, without its busy handler, where waiting could deadlock; processes opening a new registry together
    met that (a writer among four forked at once failed with "database is locked" under load). Only the first
    connection to a database switches it: the mode is kept in the file, so later ones read it and go on.
    """
    while True:
        try:
            if dbapi_connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                dbapi_connection.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if e.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")


class Database:
    """Transactions on the registry's database, with the backend's locking and change notices."""

    def __init__(self, url: URL, *, busy_timeout_s: float) -> None:
        self.url = url
        self.is_postgres = url.get_backend_name() == "postgresql"
        self.engine = create(url, busy_timeout_s=busy_timeout_s)
        self._known_down: Callable[[], bool] = lambda: False

    def fail_fast(self, known_down: Callable[[], bool]) -> None:
        """Refuse every call at once, with no connection attempt, while ``known_down()`` (the change feed's
        outage): a connection to a database that stopped answering could otherwise wait for a TCP timeout."""
        self._known_down = known_down

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """One consistent snapshot for reads that span several statements."""
        with self._connect() as conn:
            if self.is_postgres:  # READ COMMITTED would let a commit land between two statements
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn

    @contextmanager
    def write(self, names: Iterable[str]) -> Iterator[Connection]:
        """One write transaction that changes ``names``: serialized with every other writer of them.

        SQLite: the database's write lock, from the first statement. PostgreSQL:
        a transaction advisory lock per name (sorted: two writers never wait on
        each other in a circle), and a notice per name sent with the commit.
        """
        changed = sorted(set(names))
        with self._connect() as conn:
            conn.execution_options(**{_WRITE: True})
            with conn.begin():
                self.lock_names(conn, changed)
                yield conn
                self.notify(conn, changed)

    @contextmanager
    def locked(self, lock_class: int, key: str) -> Iterator[Connection]:
        """A write transaction that holds the lock of ``key`` in ``lock_class`` until it ends, with no change notice
        (it changes no adapter): an advisory lock on PostgreSQL, the database's write lock on SQLite."""
        with self._connect() as conn:
            conn.execution_options(**{_WRITE: True})
            with conn.begin():
                if self.is_postgres:
                    conn.execute(
                        text("SELECT pg_advisory_xact_lock(:cls, hashtext(:key))"), {"cls": lock_class, "key": key}
                    )
                yield conn

    def lock_names(self, conn: Connection, names: Iterable[str]) -> None:
        """Wait for, and hold until the transaction ends, the write lock of each name (PostgreSQL only)."""
        if self.is_postgres:
            for name in sorted(set(names)):
                conn.execute(
                    text("SELECT pg_advisory_xact_lock(:cls, hashtext(:name))"), {"cls": NAME_LOCK_CLASS, "name": name}
                )

    def notify(self, conn: Connection, names: Iterable[str]) -> None:
        """Tell every listening replica, when this transaction commits, that ``names`` changed (PostgreSQL only)."""
        if self.is_postgres:
            for name in sorted(set(names)):
                conn.execute(text("SELECT pg_notify(:channel, :name)"), {"channel": NOTIFY_CHANNEL, "name": name})

    def publish(self, channel: str, payload: str) -> None:
        """Send ``payload`` on ``channel`` to every listening replica now (PostgreSQL only; nothing to do on SQLite).

        ``RegistryUnavailable`` if the database cannot be reached.
        """
        if self.is_postgres:
            with self._connect() as conn, conn.begin():
                conn.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": channel, "payload": payload})

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        if self._known_down():
            raise self._unavailable_reason("it stopped answering; this replica reconnects by itself")
        try:
            with self.engine.connect() as conn:
                yield conn
        except DBAPIError as e:
            if self._is_outage(e):
                raise self._unavailable(e) from e
            raise

    def _is_outage(self, e: DBAPIError) -> bool:
        """The database is down or unreachable (not a deadlock or serialization failure, which are its answers)."""
        if not self.is_postgres:
            return False
        return e.connection_invalidated or (
            isinstance(e.orig, psycopg.OperationalError) and not isinstance(e.orig, psycopg.errors.TransactionRollback)
        )

    def _unavailable(self, e: DBAPIError) -> RegistryUnavailable:
        cause = str(e.orig).strip()
        reason = cause.splitlines()[0] if cause else type(e).__name__
        if self.url.password:
            reason = reason.replace(str(self.url.password), "***")
        return self._unavailable_reason(reason)

    def _unavailable_reason(self, reason: str) -> RegistryUnavailable:
        where = self.url.set(drivername="postgresql")
        return RegistryUnavailable(
            f"the adapter registry database {mask(where)} cannot be reached ({reason}); a change being made may not "
            "have been saved, so read it back once the database answers. Check that PostgreSQL is running and "
            "reachable from this replica and that PGPASSWORD holds the right password; the registry reconnects "
            "by itself, no restart needed"
        )
