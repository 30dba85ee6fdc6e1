"""The adapter registry: names, immutable versions, aliases, pins and health, in SQLite.

One database file under the store root, in WAL mode so readers never block the
writer. Every change runs in a ``BEGIN IMMEDIATE`` transaction: the write lock
is taken up front, so two writers (threads or worker processes) queue on the
busy timeout instead of failing half-way with "database is locked" when a read
transaction tries to upgrade. Each thread gets its own connection.

A version is identified by the sha256 over its files; registering the same
files again is a no-op that returns the existing version. The alias
``latest`` always points at the newest version and is maintained here; every
other alias is set explicitly.

Ownership belongs to the adapter *name*: ``adapters.tenant`` (NULL: public) is
set by the name's first registration and never changed by a later version; a
registration for a different tenant is refused with :class:`OwnershipConflict`.

The tables and their upgrades from older files are in ``adapter_store.schema``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from adapter_store.catalog import CatalogEntry
from adapter_store.errors import (
    AdapterNotFound,
    AdapterPinned,
    AmbiguousVersion,
    InvalidRef,
    OwnershipConflict,
    VersionConflict,
)
from adapter_store.models import AdapterMetadata, AdapterVersion, HealthRecord, HealthState
from adapter_store.refs import DIGEST_LEN, LATEST, AdapterRef, check_alias, check_name, check_version
from adapter_store.schema import migrate, owner_text

DB_NAME = "registry.sqlite3"

_VERSION_COLUMNS = (
    "v.name, v.digest, v.base_model, v.rank, v.alpha, v.target_modules, v.size_bytes, "
    "v.created_at, v.source, v.tags, v.pinned, v.legacy_digest"
)


def _row_to_version(row: tuple) -> AdapterVersion:
    name, digest, base, rank, alpha, targets, size, created, source, tags, pinned, legacy = row
    return AdapterVersion(
        name=name,
        version=digest,
        metadata=AdapterMetadata(
            base_model=base, rank=rank, alpha=alpha, target_modules=tuple(json.loads(targets)), size_bytes=size
        ),
        source=source,
        created_at=created,
        tags=json.loads(tags),
        pinned=bool(pinned),
        legacy_digest=bool(legacy),
    )


class AdapterRegistry:
    """Persistent registry of adapter versions; safe across threads and processes."""

    def __init__(
        self, root: Path, *, busy_timeout_s: float = 30.0, configured_owners: Mapping[str, str | None] | None = None
    ) -> None:
        """Open (or create, or upgrade) the registry under ``root``.

        ``configured_owners`` (name → tenant) are owners schema 1 did not keep
        in the file because serving's config set them; they are used only when
        upgrading a schema-1 file, and win over its tags, as they did then.
        """
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / DB_NAME
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        with self._write() as conn:
            migrate(conn, self.path, configured_owners or {})

    # -- connections and transactions -------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding the database's write lock from its first statement."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One consistent snapshot for reads that span several statements."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._connections_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    # -- registering ------------------------------------------------------------------

    def register(
        self,
        name: str,
        digest: str,
        metadata: AdapterMetadata,
        *,
        source: str,
        tags: dict[str, str] | None = None,
        aliases: tuple[str, ...] = (),
        tenant: str | None = None,
    ) -> tuple[AdapterVersion, bool]:
        """Add a version (idempotent per digest); returns it and whether it is new.

        A new version becomes ``latest``; ``aliases`` are pointed at it as well.
        Registering files that are already a version changes nothing but the
        given aliases: versions are immutable, their source and tags included.
        ``tenant`` must be the name's owner (``None``: public) if the name
        exists, identical files included; a new name gets it as its owner.
        """
        check_name(name)
        if len(digest) != DIGEST_LEN:
            raise InvalidRef(f"digest must be the full sha256 ({DIGEST_LEN} hex digits), got {digest!r}")
        check_version(digest, "digest")
        for alias in aliases:
            self._check_settable(alias)
        now = time.time()
        with self._write() as conn:
            self._claim(conn, name, tenant, now)
            cursor = conn.execute(
                "INSERT OR IGNORE INTO versions (name, digest, base_model, rank, alpha, target_modules, "
                "size_bytes, created_at, source, tags) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    digest,
                    metadata.base_model,
                    metadata.rank,
                    metadata.alpha,
                    json.dumps(list(metadata.target_modules)),
                    metadata.size_bytes,
                    now,
                    source,
                    json.dumps(tags or {}, sort_keys=True),
                ),
            )
            created = cursor.rowcount == 1
            if created:
                self._point(conn, name, LATEST, digest, now)
            for alias in aliases:
                self._point(conn, name, alias, digest, now)
            return self._version(conn, name, digest), created

    def check_owner(self, name: str, tenant: str | None) -> None:
        """Refuse early (before any fetch) what :meth:`register` would refuse for ownership."""
        owner = self._conn().execute("SELECT tenant FROM adapters WHERE name = ?", (name,)).fetchone()
        if owner is not None and owner[0] != tenant:
            raise self._conflict(name, owner[0], tenant)

    def _claim(self, conn: sqlite3.Connection, name: str, tenant: str | None, now: float) -> None:
        owner = conn.execute("SELECT tenant FROM adapters WHERE name = ?", (name,)).fetchone()
        if owner is None:
            conn.execute("INSERT INTO adapters (name, created_at, tenant) VALUES (?, ?, ?)", (name, now, tenant))
        elif owner[0] != tenant:
            raise self._conflict(name, owner[0], tenant)

    @staticmethod
    def _conflict(name: str, owner: str | None, tenant: str | None) -> OwnershipConflict:
        return OwnershipConflict(
            f"adapter {name!r} belongs to {owner_text(owner)}, so a version for {owner_text(tenant)} is refused: "
            "an adapter's owner is set by its first registration and every version shares it. Register with "
            "the same tenant, or under another name",
            param="tenant",
        )

    @staticmethod
    def _point(conn: sqlite3.Connection, name: str, alias: str, digest: str, now: float) -> None:
        conn.execute(
            "INSERT INTO aliases (name, alias, digest, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name, alias) DO UPDATE SET digest = excluded.digest, updated_at = excluded.updated_at",
            (name, alias, digest, now),
        )

    @staticmethod
    def _check_settable(alias: str) -> None:
        check_alias(alias)
        if alias == LATEST:
            raise InvalidRef(
                f"alias {LATEST!r} is maintained by the registry (it always names the newest version); "
                "set another alias such as 'stable'",
                param="alias",
            )

    # -- resolving --------------------------------------------------------------------

    def get(self, ref: str | AdapterRef) -> AdapterVersion:
        """The version a reference names; ``AdapterNotFound`` or ``AmbiguousVersion`` otherwise."""
        parsed = ref if isinstance(ref, AdapterRef) else AdapterRef.parse(ref)
        with self._read() as conn:
            return self._resolve(conn, parsed)

    def _resolve(self, conn: sqlite3.Connection, ref: AdapterRef) -> AdapterVersion:
        if ref.alias is not None:
            row = conn.execute(
                f"SELECT {_VERSION_COLUMNS} FROM aliases a JOIN versions v ON v.name = a.name AND v.digest = a.digest "
                "WHERE a.name = ? AND a.alias = ?",
                (ref.name, ref.alias),
            ).fetchone()
            if row is None:
                self._raise_missing(conn, ref.name, f"has no alias {ref.alias!r}", "alias")
            return _row_to_version(row)
        rows = conn.execute(
            f"SELECT {_VERSION_COLUMNS} FROM versions v WHERE v.name = ? AND v.digest LIKE ? LIMIT 2",
            (ref.name, f"{ref.version}%"),
        ).fetchall()
        if not rows:
            self._raise_missing(conn, ref.name, f"has no version {ref.version!r}", "version")
        if len(rows) > 1:
            raise AmbiguousVersion(
                f"version prefix {ref.version!r} of adapter {ref.name!r} matches several versions "
                f"({rows[0][1][:16]}..., {rows[1][1][:16]}...); give more hex digits",
                param="version",
            )
        return _row_to_version(rows[0])

    def _raise_missing(self, conn: sqlite3.Connection, name: str, what: str, param: str) -> None:
        if conn.execute("SELECT 1 FROM adapters WHERE name = ?", (name,)).fetchone() is None:
            raise AdapterNotFound(f"adapter {name!r} is not registered; register it from a source first", param="name")
        aliases = [r[0] for r in conn.execute("SELECT alias FROM aliases WHERE name = ? ORDER BY alias", (name,))]
        raise AdapterNotFound(
            f"adapter {name!r} {what}; its aliases are {', '.join(aliases) or 'none'} (list its versions to pick one)",
            param=param,
        )

    def _version(self, conn: sqlite3.Connection, name: str, digest: str) -> AdapterVersion:
        row = conn.execute(
            f"SELECT {_VERSION_COLUMNS} FROM versions v WHERE v.name = ? AND v.digest = ?", (name, digest)
        ).fetchone()
        if row is None:
            raise AdapterNotFound(f"adapter {name!r} has no version {digest[:16]}...", param="version")
        return _row_to_version(row)

    def owner(self, name: str) -> str | None:
        """The tenant that owns ``name`` (``None``: public); ``AdapterNotFound`` if it is not registered."""
        row = self._conn().execute("SELECT tenant FROM adapters WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise AdapterNotFound(f"adapter {name!r} is not registered", param="name")
        return row[0]

    def snapshot(self, name: str) -> CatalogEntry | None:
        """Everything a request for ``name`` needs, read in one transaction; ``None`` if it is not registered."""
        with self._read() as conn:
            owner = conn.execute("SELECT tenant FROM adapters WHERE name = ?", (name,)).fetchone()
            if owner is None:
                return None
            rows = conn.execute(f"SELECT {_VERSION_COLUMNS} FROM versions v WHERE v.name = ?", (name,)).fetchall()
            aliases = conn.execute("SELECT alias, digest FROM aliases WHERE name = ?", (name,)).fetchall()
            health = conn.execute(
                "SELECT digest, state, reason, checked_at, latency_s FROM health WHERE name = ?", (name,)
            ).fetchall()
        return CatalogEntry(
            name=name,
            owner=owner[0],
            versions={v.version: v for v in map(_row_to_version, rows)},
            aliases=dict(aliases),
            health={digest: HealthRecord(*rest) for digest, *rest in health},
        )

    # -- listing ----------------------------------------------------------------------

    def names(self) -> list[str]:
        return [r[0] for r in self._conn().execute("SELECT name FROM adapters ORDER BY name")]

    def versions(self, name: str) -> list[AdapterVersion]:
        """Every version of ``name``, newest first."""
        rows = (
            self._conn()
            .execute(f"SELECT {_VERSION_COLUMNS} FROM versions v WHERE v.name = ? ORDER BY v.seq DESC", (name,))
            .fetchall()
        )
        if not rows:
            raise AdapterNotFound(f"adapter {name!r} is not registered", param="name")
        return [_row_to_version(r) for r in rows]

    def all_versions(self) -> list[AdapterVersion]:
        rows = self._conn().execute(f"SELECT {_VERSION_COLUMNS} FROM versions v ORDER BY v.name, v.seq DESC")
        return [_row_to_version(r) for r in rows]

    def aliases(self, name: str) -> dict[str, str]:
        """Alias → full digest for one adapter."""
        rows = self._conn().execute("SELECT alias, digest FROM aliases WHERE name = ? ORDER BY alias", (name,))
        return dict(rows.fetchall())

    def pinned(self) -> list[AdapterVersion]:
        rows = self._conn().execute(f"SELECT {_VERSION_COLUMNS} FROM versions v WHERE v.pinned = 1 ORDER BY v.seq")
        return [_row_to_version(r) for r in rows]

    # -- changing ---------------------------------------------------------------------

    def set_alias(self, name: str, alias: str, ref: str, *, expected: str | None = None) -> AdapterVersion:
        """Point ``name@alias`` at the version ``ref`` names (``name@...`` or a bare version/alias).

        With ``expected`` (a digest or prefix), the change only happens if the
        alias currently points there: a compare-and-set for concurrent admins.
        """
        self._check_settable(alias)
        target = AdapterRef.parse(ref if "@" in ref else f"{name}@{ref}", param="version")
        if target.name != name:
            raise InvalidRef(f"alias of {name!r} cannot point at adapter {target.name!r}", param="version")
        with self._write() as conn:
            version = self._resolve(conn, target)
            if expected is not None:
                row = conn.execute("SELECT digest FROM aliases WHERE name = ? AND alias = ?", (name, alias)).fetchone()
                current = row[0] if row else None
                if current is None or not current.startswith(expected.lower()):
                    raise VersionConflict(
                        f"alias {name}@{alias} points at {current or 'nothing'}, not {expected!r}: "
                        "someone changed it; read it again and retry",
                        param="expected",
                    )
            self._point(conn, name, alias, version.version, time.time())
            return version

    def remove_alias(self, name: str, alias: str) -> None:
        self._check_settable(alias)
        with self._write() as conn:
            if conn.execute("DELETE FROM aliases WHERE name = ? AND alias = ?", (name, alias)).rowcount == 0:
                self._raise_missing(conn, name, f"has no alias {alias!r}", "alias")

    def set_pinned(self, ref: str, pinned: bool) -> AdapterVersion:
        with self._write() as conn:
            version = self._resolve(conn, AdapterRef.parse(ref))
            conn.execute(
                "UPDATE versions SET pinned = ? WHERE name = ? AND digest = ?",
                (int(pinned), version.name, version.version),
            )
            return self._version(conn, version.name, version.version)

    def delete(self, ref: str) -> AdapterVersion:
        """Remove one version; refused while pinned or while an alias other than ``latest`` names it.

        ``latest`` moves to the newest remaining version; the adapter goes away
        with its last version. Callers check leases (in use) before calling.
        """
        with self._write() as conn:
            version = self._resolve(conn, AdapterRef.parse(ref))
            name, digest = version.name, version.version
            if version.pinned:
                raise AdapterPinned(f"{name}@{digest[:16]} is pinned; unpin it before deleting it", param="version")
            aliased = [
                r[0]
                for r in conn.execute(
                    "SELECT alias FROM aliases WHERE name = ? AND digest = ? AND alias != ? ORDER BY alias",
                    (name, digest, LATEST),
                )
            ]
            if aliased:
                raise VersionConflict(
                    f"{name}@{digest[:16]} is the target of alias(es) {', '.join(aliased)}; "
                    "point them at another version or remove them first",
                    param="version",
                )
            conn.execute("DELETE FROM aliases WHERE name = ? AND digest = ?", (name, digest))
            conn.execute("DELETE FROM health WHERE name = ? AND digest = ?", (name, digest))
            conn.execute("DELETE FROM versions WHERE name = ? AND digest = ?", (name, digest))
            newest = conn.execute(
                "SELECT digest FROM versions WHERE name = ? ORDER BY seq DESC LIMIT 1", (name,)
            ).fetchone()
            if newest is None:
                conn.execute("DELETE FROM adapters WHERE name = ?", (name,))
            else:
                self._point(conn, name, LATEST, newest[0], time.time())
            return version

    # -- digest migration -------------------------------------------------------------

    def legacy_digests(self) -> list[str]:
        """The digests still in an older format (every version with one shares its files)."""
        rows = self._conn().execute("SELECT DISTINCT digest FROM versions WHERE legacy_digest = 1 ORDER BY digest")
        return [r[0] for r in rows]

    def rekey(self, old: str, new: str, *, move: Callable[[], None], upload_scheme: str = "upload") -> None:
        """Give every version with digest ``old`` the digest ``new``, in one transaction.

        Aliases and health move along; an ``upload:<old>`` source becomes
        ``upload:<new>``. ``move`` renames the files on disk (cache and upload
        directories); it runs inside the transaction, so if it fails nothing
        in the registry changes.
        """
        with self._write() as conn:
            conn.execute("PRAGMA defer_foreign_keys = ON")  # parent and child keys change together
            if new != old:
                # A name that meanwhile got these files again as a new-format version keeps that one.
                for (name,) in conn.execute(
                    "SELECT name FROM versions WHERE digest = ? "
                    "AND name IN (SELECT name FROM versions WHERE digest = ?)",
                    (old, new),
                ).fetchall():
                    conn.execute("UPDATE aliases SET digest = ? WHERE name = ? AND digest = ?", (new, name, old))
                    conn.execute("DELETE FROM health WHERE name = ? AND digest = ?", (name, old))
                    conn.execute("DELETE FROM versions WHERE name = ? AND digest = ?", (name, old))
                for table in ("versions", "aliases", "health"):
                    conn.execute(f"UPDATE {table} SET digest = ? WHERE digest = ?", (new, old))
                conn.execute(
                    "UPDATE versions SET source = ? WHERE digest = ? AND source = ?",
                    (f"{upload_scheme}:{new}", new, f"{upload_scheme}:{old}"),
                )
            conn.execute("UPDATE versions SET legacy_digest = 0 WHERE digest = ?", (new,))
            move()

    # -- health -----------------------------------------------------------------------

    def record_health(
        self, name: str, digest: str, state: HealthState, *, reason: str | None = None, latency_s: float | None = None
    ) -> HealthRecord:
        if state not in ("ok", "failed", "unchecked"):
            raise ValueError(f"health state must be ok, failed or unchecked, got {state!r}")
        record = HealthRecord(state=state, reason=reason, checked_at=time.time(), latency_s=latency_s)
        with self._write() as conn:
            self._version(conn, name, digest)  # raises if gone
            conn.execute(
                "INSERT INTO health (name, digest, state, reason, checked_at, latency_s) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (name, digest) DO UPDATE SET state = excluded.state, reason = excluded.reason, "
                "checked_at = excluded.checked_at, latency_s = excluded.latency_s",
                (name, digest, state, reason, record.checked_at, latency_s),
            )
        return record

    def health(self, name: str, digest: str) -> HealthRecord:
        row = (
            self._conn()
            .execute(
                "SELECT state, reason, checked_at, latency_s FROM health WHERE name = ? AND digest = ?", (name, digest)
            )
            .fetchone()
        )
        return HealthRecord() if row is None else HealthRecord(*row)
