"""The registry's tables, one definition for SQLite and PostgreSQL, and the upgrade of schema-1 files.

The tables are SQLAlchemy Core :class:`~sqlalchemy.Table` objects; Alembic
(``adapter_store.migrations``) creates and upgrades them, and its head must
match these definitions (a test compares them with autogenerate on both
backends). Revision 1 is what ``PRAGMA user_version`` 2 named before Alembic.

The foreign keys to ``versions(name, digest)`` are deferrable: re-keying a
digest (``AdapterRegistry.rekey``) changes parent and child keys in one
transaction, which PostgreSQL checks at the end of each statement otherwise.
(SQLite files from before Alembic have immediate ones; on SQLite the registry
defers its checks with ``PRAGMA defer_foreign_keys`` instead.) On PostgreSQL every ``digest`` column uses the ``C`` collation, so a version
prefix is a plain byte range of the ``(name, digest)`` index whatever the
database's locale.

Schema history before Alembic (SQLite only, ``PRAGMA user_version``): 1 had no
owner column (the owner was a ``tenant`` tag on each version) and hashed files
with the old digest format; 2 adds ``adapters.tenant`` and
``versions.legacy_digest``. Opening a version-1 file upgrades it in place
(:func:`upgrade_from_v1`): each name's owner comes from its oldest version's
tag (any tenant wins over public if versions disagree, logged), and every
version is marked ``legacy_digest`` until the store re-hashes it
(``adapter_store.migration``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from sqlalchemy import (
    Column,
    Connection,
    Float,
    ForeignKeyConstraint,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite

logger = logging.getLogger(__name__)

LEGACY_SCHEMA_VERSION = 2  # the last PRAGMA user_version before Alembic; Alembic revision 1 is the same schema
_V1_TENANT_TAG = "tenant"  # where schema 1 kept an adapter's owner, on each version

metadata = MetaData()


def _real() -> Float:
    """A double; named REAL on SQLite, as the files before Alembic declared it (same affinity, no diff)."""
    return Float().with_variant(sqlite.REAL(), "sqlite")


def _digest() -> Column:
    return Column("digest", Text().with_variant(postgresql.TEXT(collation="C"), "postgresql"), nullable=False)


def _to_version() -> ForeignKeyConstraint:
    return ForeignKeyConstraint(
        ["name", "digest"], ["versions.name", "versions.digest"], deferrable=True, initially="IMMEDIATE"
    )


adapters = Table(
    "adapters",
    metadata,
    Column("name", Text, primary_key=True),
    Column("created_at", _real(), nullable=False),
    Column("tenant", Text),  # the owner, set by the name's first registration; NULL: public
)

versions = Table(
    "versions",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),  # registration order: newest = highest
    Column("name", Text, nullable=False),
    _digest(),
    Column("base_model", Text, nullable=False),
    Column("rank", Integer, nullable=False),
    Column("alpha", _real(), nullable=False),
    Column("target_modules", Text, nullable=False),  # JSON list
    Column("size_bytes", Integer, nullable=False),
    Column("created_at", _real(), nullable=False),
    Column("source", Text, nullable=False),
    Column("tags", Text, nullable=False),  # JSON object
    Column("pinned", Integer, nullable=False, server_default=text("0")),
    Column("legacy_digest", Integer, nullable=False, server_default=text("0")),
    ForeignKeyConstraint(["name"], ["adapters.name"]),
    UniqueConstraint("name", "digest"),  # also the index every resolve by name and version prefix uses
    sqlite_autoincrement=True,  # a deleted newest version's seq is never reused
)

aliases = Table(
    "aliases",
    metadata,
    Column("name", Text, nullable=False),
    Column("alias", Text, nullable=False),
    _digest(),
    Column("updated_at", _real(), nullable=False),
    PrimaryKeyConstraint("name", "alias"),
    _to_version(),
)

health = Table(
    "health",
    metadata,
    Column("name", Text, nullable=False),
    _digest(),
    Column("state", Text, nullable=False),
    Column("reason", Text),
    Column("checked_at", _real()),
    Column("latency_s", _real()),
    PrimaryKeyConstraint("name", "digest"),
    ForeignKeyConstraint(
        ["name", "digest"],
        ["versions.name", "versions.digest"],
        ondelete="CASCADE",
        deferrable=True,
        initially="IMMEDIATE",
    ),
)


def owner_text(tenant: str | None) -> str:
    return "no tenant (public)" if tenant is None else f"tenant {tenant!r}"


def upgrade_from_v1(conn: Connection, configured: Mapping[str, str | None]) -> None:
    """Schema 1 → 2 of a SQLite file: owners move from version tags onto names; every digest is marked for re-hashing.

    ``configured`` (name → tenant) are owners schema 1 took from serving's
    config rather than the file; they win over the tags, as they did then.
    """
    conn.exec_driver_sql("ALTER TABLE adapters ADD COLUMN tenant TEXT")
    conn.exec_driver_sql("ALTER TABLE versions ADD COLUMN legacy_digest INTEGER NOT NULL DEFAULT 0")
    conn.execute(versions.update().values(legacy_digest=1))
    for (name,) in conn.execute(adapters.select().with_only_columns(adapters.c.name)).all():
        rows = conn.execute(
            versions.select().with_only_columns(versions.c.tags).where(versions.c.name == name).order_by(versions.c.seq)
        ).all()
        tags = [json.loads(t).get(_V1_TENANT_TAG) for (t,) in rows]
        owned = [t for t in tags if t is not None]
        owner = owned[0] if owned else None  # the oldest tenant; any tenant is safer than public
        if name in configured:
            owner = configured[name]
        elif len(set(tags)) > 1:
            logger.warning(
                "adapter %r: its versions were tagged with different tenants %s (oldest first); "
                "it now belongs to %s, for every version",
                name,
                tags,
                owner_text(owner),
            )
        conn.execute(adapters.update().where(adapters.c.name == name).values(tenant=owner))
