"""The adapter registry: names, immutable versions, aliases, pins and health, in SQLite or PostgreSQL.

By default one SQLite file under the store root; with ``store.registry`` a
PostgreSQL database every replica of a fleet shares. The queries are
SQLAlchemy Core on the tables of ``adapter_store.schema``, the same for both;
``adapter_store.registry_db`` holds what differs: how a write transaction
locks (SQLite's write lock from its first statement; a per-name advisory lock
on PostgreSQL, so the read-then-write of an ownership claim, an alias
compare-and-set or a delete never interleaves with another writer of that
name), the change notices PostgreSQL sends on commit, and the
:class:`RegistryUnavailable` an unreachable database raises. The tables are
created or upgraded (Alembic, ``adapter_store.migrations``) when it opens.

A version is identified by the sha256 over its files; registering the same
files again is a no-op that returns the existing version. The alias
``latest`` always points at the newest version and is maintained here; every
other alias is set explicitly.

Ownership belongs to the adapter *name*: ``adapters.tenant`` (NULL: public) is
set by the name's first registration and never changed by a later version; a
registration for a different tenant is refused with :class:`OwnershipConflict`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from sqlalchemy import URL, Connection, Text, and_, bindparam, delete, select, text, update
from sqlalchemy.dialects import postgresql, sqlite

from adapter_store.catalog import CatalogEntry
from adapter_store.errors import (
    AdapterNotFound,
    AdapterPinned,
    AmbiguousVersion,
    InvalidRef,
    OwnershipConflict,
    VersionConflict,
)
from adapter_store.migrations import upgrade
from adapter_store.models import AdapterMetadata, AdapterVersion, HealthRecord, HealthState
from adapter_store.refs import DIGEST_LEN, LATEST, AdapterRef, check_alias, check_name, check_version
from adapter_store.registry_db import DB_NAME, UPLOAD_LOCK_CLASS, Database, mask, parse_url
from adapter_store.schema import adapters, aliases, health, owner_text, versions

__all__ = ["DB_NAME", "AdapterRegistry"]

_VERSION_COLUMNS = (
    versions.c.name,
    versions.c.digest,
    versions.c.base_model,
    versions.c.rank,
    versions.c.alpha,
    versions.c.target_modules,
    versions.c.size_bytes,
    versions.c.created_at,
    versions.c.source,
    versions.c.tags,
    versions.c.pinned,
    versions.c.legacy_digest,
)
_HEALTH_COLUMNS = (health.c.state, health.c.reason, health.c.checked_at, health.c.latency_s)

# The statements of the resolve path, built once: building a Core statement costs more than running it.
_OWNER = select(adapters.c.tenant).where(adapters.c.name == bindparam("name"))
_BY_ALIAS = (
    select(*_VERSION_COLUMNS)
    .select_from(aliases.join(versions, and_(versions.c.name == aliases.c.name, versions.c.digest == aliases.c.digest)))
    .where(aliases.c.name == bindparam("name"), aliases.c.alias == bindparam("alias"))
)
# Digests are 64 lowercase hex digits: a version prefix is a range of the (name, digest) index. The bounds
# are plain Text: PostgreSQL cannot parse the column's COLLATE "C" cast inside BETWEEN (the column's applies).
_BY_RANGE = (
    select(*_VERSION_COLUMNS)
    .where(
        versions.c.name == bindparam("name"),
        versions.c.digest.between(bindparam("low", type_=Text()), bindparam("high", type_=Text())),
    )
    .limit(2)
)
_BY_DIGEST = select(*_VERSION_COLUMNS).where(
    versions.c.name == bindparam("name"), versions.c.digest == bindparam("digest")
)


def _row_to_version(row: Sequence[Any]) -> AdapterVersion:
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


def _named(name: str) -> Any:
    return versions.c.name == name


class AdapterRegistry:
    """Persistent registry of adapter versions; safe across threads, processes and (on PostgreSQL) replicas."""

    def __init__(
        self,
        root: Path,
        *,
        url: str | None = None,
        busy_timeout_s: float = 30.0,
        configured_owners: Mapping[str, str | None] | None = None,
    ) -> None:
        """Open (or create, or upgrade) the registry: ``url`` if given, else the SQLite file under ``root``.

        ``url``: ``postgresql://user@host:port/db`` or ``sqlite:///path`` (see
        ``registry_db.parse_url``). ``configured_owners`` (name → tenant) are
        owners schema 1 did not keep in the file because serving's config set
        them; they are used only when upgrading a schema-1 file, and win over
        its tags, as they did then.
        """
        parsed = parse_url(url) if url is not None else URL.create("sqlite", database=str(root / DB_NAME))
        self.url: URL = parsed  # its str() and repr() hide the password
        # The SQLite file (the catalog reads its data version); None on PostgreSQL.
        self.path: Path | None = None if parsed.get_backend_name() == "postgresql" else Path(parsed.database or "")
        self.busy_timeout_s = busy_timeout_s
        self._db = Database(parsed, busy_timeout_s=busy_timeout_s)
        self._insert = postgresql.insert if self._db.is_postgres else sqlite.insert
        with self._db.write(()) as conn:
            upgrade(conn, where=mask(parsed), configured_owners=configured_owners or {})

    def close(self) -> None:
        self._db.close()

    def fail_fast(self, known_down: Callable[[], bool]) -> None:
        """Refuse every call at once (``RegistryUnavailable``) while ``known_down()``: see ``registry_db``."""
        self._db.fail_fast(known_down)

    def publish(self, channel: str, payload: str) -> None:
        """Notify ``channel`` with ``payload`` for every replica listening (PostgreSQL; a no-op on SQLite)."""
        self._db.publish(channel, payload)

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
        with self._db.write([name]) as conn:
            self._claim(conn, name, tenant, now)
            inserted = conn.execute(
                self._insert(versions)
                .values(
                    name=name,
                    digest=digest,
                    base_model=metadata.base_model,
                    rank=metadata.rank,
                    alpha=metadata.alpha,
                    target_modules=json.dumps(list(metadata.target_modules)),
                    size_bytes=metadata.size_bytes,
                    created_at=now,
                    source=source,
                    tags=json.dumps(tags or {}, sort_keys=True),
                )
                .on_conflict_do_nothing(index_elements=["name", "digest"])
                .returning(versions.c.seq)
            )
            created = inserted.first() is not None
            if created:
                self._point(conn, name, LATEST, digest, now)
            for alias in aliases:
                self._point(conn, name, alias, digest, now)
            return self._version(conn, name, digest), created

    def check_owner(self, name: str, tenant: str | None) -> None:
        """Refuse early (before any fetch) what :meth:`register` would refuse for ownership."""
        with self._db.read() as conn:
            owner = conn.execute(_OWNER, {"name": name}).first()
        if owner is not None and owner[0] != tenant:
            raise self._conflict(name, owner[0], tenant)

    def _claim(self, conn: Connection, name: str, tenant: str | None, now: float) -> None:
        owner = conn.execute(_OWNER, {"name": name}).first()
        if owner is None:
            conn.execute(adapters.insert().values(name=name, created_at=now, tenant=tenant))
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

    def _point(self, conn: Connection, name: str, alias: str, digest: str, now: float) -> None:
        insert = self._insert(aliases).values(name=name, alias=alias, digest=digest, updated_at=now)
        conn.execute(
            insert.on_conflict_do_update(
                index_elements=["name", "alias"],
                set_={"digest": insert.excluded.digest, "updated_at": insert.excluded.updated_at},
            )
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
        with self._db.read() as conn:
            return self._resolve(conn, parsed)

    def _resolve(self, conn: Connection, ref: AdapterRef) -> AdapterVersion:
        if ref.alias is not None:
            row = conn.execute(_BY_ALIAS, {"name": ref.name, "alias": ref.alias}).first()
            if row is None:
                self._raise_missing(conn, ref.name, f"has no alias {ref.alias!r}", "alias")
            return _row_to_version(row)
        assert ref.version is not None
        pad = DIGEST_LEN - len(ref.version)
        bounds = {"low": ref.version + "0" * pad, "high": ref.version + "f" * pad}
        rows = conn.execute(_BY_RANGE, {"name": ref.name, **bounds}).all()
        if not rows:
            self._raise_missing(conn, ref.name, f"has no version {ref.version!r}", "version")
        if len(rows) > 1:
            raise AmbiguousVersion(
                f"version prefix {ref.version!r} of adapter {ref.name!r} matches several versions "
                f"({rows[0][1][:16]}..., {rows[1][1][:16]}...); give more hex digits",
                param="version",
            )
        return _row_to_version(rows[0])

    def _raise_missing(self, conn: Connection, name: str, what: str, param: str) -> NoReturn:
        if conn.execute(select(adapters.c.name).where(adapters.c.name == name)).first() is None:
            raise AdapterNotFound(f"adapter {name!r} is not registered; register it from a source first", param="name")
        names = conn.scalars(select(aliases.c.alias).where(aliases.c.name == name).order_by(aliases.c.alias)).all()
        raise AdapterNotFound(
            f"adapter {name!r} {what}; its aliases are {', '.join(names) or 'none'} (list its versions to pick one)",
            param=param,
        )

    def _version(self, conn: Connection, name: str, digest: str) -> AdapterVersion:
        row = conn.execute(_BY_DIGEST, {"name": name, "digest": digest}).first()
        if row is None:
            raise AdapterNotFound(f"adapter {name!r} has no version {digest[:16]}...", param="version")
        return _row_to_version(row)

    def owner(self, name: str) -> str | None:
        """The tenant that owns ``name`` (``None``: public); ``AdapterNotFound`` if it is not registered."""
        with self._db.read() as conn:
            row = conn.execute(_OWNER, {"name": name}).first()
        if row is None:
            raise AdapterNotFound(f"adapter {name!r} is not registered", param="name")
        return row[0]

    def snapshot(self, name: str) -> CatalogEntry | None:
        """Everything a request for ``name`` needs, read in one transaction; ``None`` if it is not registered."""
        with self._db.read() as conn:
            owner = conn.execute(_OWNER, {"name": name}).first()
            if owner is None:
                return None
            rows = conn.execute(select(*_VERSION_COLUMNS).where(_named(name)).order_by(versions.c.seq.desc())).all()
            pointers = conn.execute(
                select(aliases.c.alias, aliases.c.digest).where(aliases.c.name == name).order_by(aliases.c.alias)
            ).all()
            checks = conn.execute(select(health.c.digest, *_HEALTH_COLUMNS).where(health.c.name == name)).all()
        return CatalogEntry(
            name=name,
            owner=owner[0],
            versions={v.version: v for v in map(_row_to_version, rows)},
            aliases={alias: digest for alias, digest in pointers},
            health={digest: HealthRecord(*rest) for digest, *rest in checks},
        )

    def snapshot_all(self) -> list[CatalogEntry]:
        """:meth:`snapshot` of every registered name, in code-point order, read in one transaction; each entry's
        versions newest first and aliases in order, as :meth:`versions` and :meth:`aliases` list them.

        Four queries whatever the number of adapters: listing 10,000 versions name by name would cost tens
        of thousands.
        """
        with self._db.read() as conn:
            owners = conn.execute(select(adapters.c.name, adapters.c.tenant)).all()
            rows = conn.execute(select(*_VERSION_COLUMNS).order_by(versions.c.seq.desc())).all()  # newest first
            pointers = conn.execute(
                select(aliases.c.name, aliases.c.alias, aliases.c.digest).order_by(aliases.c.alias)
            ).all()
            checks = conn.execute(select(health.c.name, health.c.digest, *_HEALTH_COLUMNS)).all()
        found: dict[str, dict[str, AdapterVersion]] = {name: {} for name, _ in owners}
        for version in map(_row_to_version, rows):
            found[version.name][version.version] = version
        named: dict[str, dict[str, str]] = {name: {} for name in found}
        for name, alias, digest in pointers:
            named[name][alias] = digest
        checked: dict[str, dict[str, HealthRecord]] = {name: {} for name in found}
        for name, digest, *rest in checks:
            checked[name][digest] = HealthRecord(*rest)
        return [
            CatalogEntry(name=name, owner=owner, versions=found[name], aliases=named[name], health=checked[name])
            for name, owner in sorted(owners, key=lambda row: row[0])
        ]

    # -- listing ----------------------------------------------------------------------

    def names(self) -> list[str]:
        with self._db.read() as conn:
            return list(conn.scalars(select(adapters.c.name).order_by(adapters.c.name)))

    def versions(self, name: str) -> list[AdapterVersion]:
        """Every version of ``name``, newest first."""
        with self._db.read() as conn:
            rows = conn.execute(select(*_VERSION_COLUMNS).where(_named(name)).order_by(versions.c.seq.desc())).all()
        if not rows:
            raise AdapterNotFound(f"adapter {name!r} is not registered", param="name")
        return [_row_to_version(r) for r in rows]

    def all_versions(self) -> list[AdapterVersion]:
        with self._db.read() as conn:
            rows = conn.execute(select(*_VERSION_COLUMNS).order_by(versions.c.name, versions.c.seq.desc())).all()
        return [_row_to_version(r) for r in rows]

    def aliases(self, name: str) -> dict[str, str]:
        """Alias → full digest for one adapter."""
        with self._db.read() as conn:
            rows = conn.execute(
                select(aliases.c.alias, aliases.c.digest).where(aliases.c.name == name).order_by(aliases.c.alias)
            ).all()
        return {alias: digest for alias, digest in rows}

    def pinned(self) -> list[AdapterVersion]:
        with self._db.read() as conn:
            rows = conn.execute(select(*_VERSION_COLUMNS).where(versions.c.pinned == 1).order_by(versions.c.seq)).all()
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
        with self._db.write([name]) as conn:
            version = self._resolve(conn, target)
            if expected is not None:
                current = conn.scalar(select(aliases.c.digest).where(aliases.c.name == name, aliases.c.alias == alias))
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
        with self._db.write([name]) as conn:
            removed = conn.execute(delete(aliases).where(aliases.c.name == name, aliases.c.alias == alias))
            if removed.rowcount == 0:
                self._raise_missing(conn, name, f"has no alias {alias!r}", "alias")

    def set_pinned(self, ref: str, pinned: bool) -> AdapterVersion:
        parsed = AdapterRef.parse(ref)
        with self._db.write([parsed.name]) as conn:
            version = self._resolve(conn, parsed)
            conn.execute(
                update(versions)
                .where(_named(version.name), versions.c.digest == version.version)
                .values(pinned=int(pinned))
            )
            return self._version(conn, version.name, version.version)

    def delete(self, ref: str) -> AdapterVersion:
        """Remove one version; refused while pinned or while an alias other than ``latest`` names it.

        ``latest`` moves to the newest remaining version; the adapter goes away
        with its last version. Callers check leases (in use) before calling.
        """
        parsed = AdapterRef.parse(ref)
        with self._db.write([parsed.name]) as conn:
            version = self._resolve(conn, parsed)
            name, digest = version.name, version.version
            if version.pinned:
                raise AdapterPinned(f"{name}@{digest[:16]} is pinned; unpin it before deleting it", param="version")
            aliased = conn.scalars(
                select(aliases.c.alias)
                .where(aliases.c.name == name, aliases.c.digest == digest, aliases.c.alias != LATEST)
                .order_by(aliases.c.alias)
            ).all()
            if aliased:
                raise VersionConflict(
                    f"{name}@{digest[:16]} is the target of alias(es) {', '.join(aliased)}; "
                    "point them at another version or remove them first",
                    param="version",
                )
            for table in (aliases, health, versions):
                conn.execute(delete(table).where(table.c.name == name, table.c.digest == digest))
            newest = conn.scalar(select(versions.c.digest).where(_named(name)).order_by(versions.c.seq.desc()).limit(1))
            if newest is None:
                conn.execute(delete(adapters).where(adapters.c.name == name))
            else:
                self._point(conn, name, LATEST, newest, time.time())
            return version

    # -- kept uploads -----------------------------------------------------------------

    @contextmanager
    def upload_lock(self, uri: str) -> Iterator[Callable[[], bool]]:
        """Hold the lock of upload ``uri`` (``upload:<sha256>``) for the whole ``with`` block, on every replica.

        Yields a check, run inside the same transaction: whether a version references the upload now (a version
        registered elsewhere counts once its transaction has committed). ``adapter_store.uploads`` keeps and
        discards an upload's files only under this lock.
        """
        with self._db.locked(UPLOAD_LOCK_CLASS, uri) as conn:
            query = select(versions.c.name).where(versions.c.source == uri).limit(1)
            yield lambda: conn.execute(query).first() is not None

    # -- digest migration -------------------------------------------------------------

    def legacy_digests(self) -> list[str]:
        """The digests still in an older format (every version with one shares its files)."""
        with self._db.read() as conn:
            query = select(versions.c.digest).where(versions.c.legacy_digest == 1).distinct()
            return list(conn.scalars(query.order_by(versions.c.digest)))

    def rekey(self, old: str, new: str, *, move: Callable[[], None], upload_scheme: str = "upload") -> None:
        """Give every version with digest ``old`` the digest ``new``, in one transaction.

        Aliases and health move along; an ``upload:<old>`` source becomes
        ``upload:<new>``. ``move`` renames the files on disk (cache and upload
        directories); it runs inside the transaction, so if it fails nothing
        in the registry changes.
        """
        with self._db.write(()) as conn:
            names = conn.scalars(select(versions.c.name).where(versions.c.digest == old)).all()
            self._db.lock_names(conn, names)
            # Parent and child keys change together: checked at commit.
            conn.execute(
                text("SET CONSTRAINTS ALL DEFERRED" if self._db.is_postgres else "PRAGMA defer_foreign_keys = ON")
            )
            if new != old:
                # A name that meanwhile got these files again as a new-format version keeps that one.
                has_new = select(versions.c.name).where(versions.c.digest == new)
                for name in conn.scalars(
                    select(versions.c.name).where(versions.c.digest == old, versions.c.name.in_(has_new))
                ).all():
                    conn.execute(
                        update(aliases).where(aliases.c.name == name, aliases.c.digest == old).values(digest=new)
                    )
                    for table in (health, versions):
                        conn.execute(delete(table).where(table.c.name == name, table.c.digest == old))
                for table in (versions, aliases, health):
                    conn.execute(update(table).where(table.c.digest == old).values(digest=new))
                conn.execute(
                    update(versions)
                    .where(versions.c.digest == new, versions.c.source == f"{upload_scheme}:{old}")
                    .values(source=f"{upload_scheme}:{new}")
                )
            conn.execute(update(versions).where(versions.c.digest == new).values(legacy_digest=0))
            move()
            self._db.notify(conn, names)

    # -- health -----------------------------------------------------------------------

    def record_health(
        self, name: str, digest: str, state: HealthState, *, reason: str | None = None, latency_s: float | None = None
    ) -> HealthRecord:
        if state not in ("ok", "failed", "unchecked"):
            raise ValueError(f"health state must be ok, failed or unchecked, got {state!r}")
        record = HealthRecord(state=state, reason=reason, checked_at=time.time(), latency_s=latency_s)
        with self._db.write([name]) as conn:
            self._version(conn, name, digest)  # raises if gone
            insert = self._insert(health).values(
                name=name, digest=digest, state=state, reason=reason, checked_at=record.checked_at, latency_s=latency_s
            )
            conn.execute(
                insert.on_conflict_do_update(
                    index_elements=["name", "digest"],
                    set_={c: insert.excluded[c] for c in ("state", "reason", "checked_at", "latency_s")},
                )
            )
        return record

    def health(self, name: str, digest: str) -> HealthRecord:
        with self._db.read() as conn:
            row = conn.execute(select(*_HEALTH_COLUMNS).where(health.c.name == name, health.c.digest == digest)).first()
        return HealthRecord() if row is None else HealthRecord(*row)
