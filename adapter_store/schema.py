"""The registry's tables, and the upgrades of files older versions of loraserve wrote.

Schema history (``PRAGMA user_version``): 1 had no owner column (the owner was
a ``tenant`` tag on each version) and hashed files with the old digest format;
2 adds ``adapters.tenant`` and ``versions.legacy_digest``. Opening a version-1
file upgrades it in place: each name's owner comes from its oldest version's
tag (any tenant wins over public if versions disagree, logged), and every
version is marked ``legacy_digest`` until the store re-hashes it
(``adapter_store.migration``).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
_V1_TENANT_TAG = "tenant"  # where schema 1 kept an adapter's owner, on each version

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    tenant TEXT
);
CREATE TABLE IF NOT EXISTS versions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL REFERENCES adapters(name),
    digest TEXT NOT NULL,
    base_model TEXT NOT NULL,
    rank INTEGER NOT NULL,
    alpha REAL NOT NULL,
    target_modules TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    source TEXT NOT NULL,
    tags TEXT NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0,
    legacy_digest INTEGER NOT NULL DEFAULT 0,
    UNIQUE (name, digest)
);
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT NOT NULL,
    alias TEXT NOT NULL,
    digest TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (name, alias),
    FOREIGN KEY (name, digest) REFERENCES versions(name, digest)
);
CREATE TABLE IF NOT EXISTS health (
    name TEXT NOT NULL,
    digest TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    checked_at REAL,
    latency_s REAL,
    PRIMARY KEY (name, digest),
    FOREIGN KEY (name, digest) REFERENCES versions(name, digest) ON DELETE CASCADE
);
"""


def migrate(conn: sqlite3.Connection, path: Path, configured: Mapping[str, str | None]) -> None:
    """Create the tables in a new file, or upgrade an older one, inside the caller's write transaction."""
    schema = conn.execute("PRAGMA user_version").fetchone()[0]
    if schema == 0:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
    elif schema == 1:
        _upgrade_from_v1(conn, configured)
    elif schema > SCHEMA_VERSION:
        raise RuntimeError(
            f"{path} has registry schema {schema}, newer than this version of loraserve "
            f"understands ({SCHEMA_VERSION}); upgrade loraserve or use another store root"
        )
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def owner_text(tenant: str | None) -> str:
    return "no tenant (public)" if tenant is None else f"tenant {tenant!r}"


def _upgrade_from_v1(conn: sqlite3.Connection, configured: Mapping[str, str | None]) -> None:
    """Schema 1 → 2: owners move from version tags onto names; every digest is marked for re-hashing."""
    conn.execute("ALTER TABLE adapters ADD COLUMN tenant TEXT")
    conn.execute("ALTER TABLE versions ADD COLUMN legacy_digest INTEGER NOT NULL DEFAULT 0")
    conn.execute("UPDATE versions SET legacy_digest = 1")
    for (name,) in conn.execute("SELECT name FROM adapters").fetchall():
        rows = conn.execute("SELECT tags FROM versions WHERE name = ? ORDER BY seq", (name,)).fetchall()
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
        conn.execute("UPDATE adapters SET tenant = ? WHERE name = ?", (owner, name))
