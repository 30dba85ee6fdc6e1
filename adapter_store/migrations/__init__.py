"""Alembic migrations of the registry's tables, run by the registry itself when it opens.

No ``alembic.ini`` is needed: :func:`upgrade` configures Alembic in code with
this directory as its script location (package data: a wheel carries the
scripts) and runs it on the caller's connection, inside the caller's write
transaction. On PostgreSQL that transaction first takes an advisory lock, so
two replicas opening an empty database at once create the tables once; DDL is
transactional there, so a failed upgrade leaves nothing behind.

SQLite files written before Alembic carry ``PRAGMA user_version`` instead of
``alembic_version``: version 1 is first upgraded in place
(``schema.upgrade_from_v1``) and then stamped at revision 1, which is schema 2;
a version-2 file is stamped at revision 1 as it is.

A new revision, from a checkout (``PYTHONPATH=.``): ``alembic -c
adapter_store/migrations/alembic.ini -x url=sqlite:////tmp/scratch.sqlite3
revision --autogenerate -m "what"`` against a database at head, then review
the script; ``... check`` says whether head matches ``adapter_store.schema``
(``tests/adapter_store/test_registry_fleet.py`` checks it on both backends).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, inspect, text

from adapter_store.registry_db import UPGRADE_LOCK_CLASS
from adapter_store.schema import LEGACY_SCHEMA_VERSION, upgrade_from_v1

SCRIPTS = Path(__file__).resolve().parent
FIRST_REVISION = "0001"  # the schema PRAGMA user_version 2 named


def config(conn: Connection | None = None) -> Config:
    """Alembic's configuration for these scripts, on ``conn`` (env.py uses it) when given."""
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPTS).replace("%", "%%"))
    if conn is not None:
        cfg.attributes["connection"] = conn
    return cfg


@cache
def scripts() -> ScriptDirectory:
    """The revision scripts, read once per process: they do not change while it runs, and reading them (every
    script compiled and its revision map built) was most of opening a registry already at head."""
    return ScriptDirectory.from_config(config())


def head() -> str:
    revision = scripts().get_current_head()
    assert revision is not None
    return revision


def upgrade(conn: Connection, *, where: str, configured_owners: Mapping[str, str | None]) -> None:
    """Bring the registry at ``conn`` (inside a write transaction) to the head revision.

    ``where`` names the database in messages; ``configured_owners``: see
    ``schema.upgrade_from_v1``.
    """
    cfg = config(conn)
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:cls, 0)"), {"cls": UPGRADE_LOCK_CLASS})
    elif not inspect(conn).has_table("alembic_version"):
        _adopt_sqlite_file(conn, cfg, where, configured_owners)
    current = MigrationContext.configure(conn).get_current_revision()
    if current == head():
        return  # nothing to run; Alembic's upgrade would load env.py and the scripts again to find that out
    if current is not None:
        try:
            scripts().get_revision(current)
        except CommandError as e:
            raise RuntimeError(
                f"the registry {where} is at schema revision {current!r}, newer than this version of loraserve "
                f"understands (head {head()!r}); upgrade loraserve or use another registry"
            ) from e
    command.upgrade(cfg, "head")


def _adopt_sqlite_file(conn: Connection, cfg: Config, where: str, configured: Mapping[str, str | None]) -> None:
    """A SQLite file from before Alembic: upgrade schema 1 to 2, then stamp it at revision 1."""
    schema = conn.exec_driver_sql("PRAGMA user_version").scalar_one()
    if schema > LEGACY_SCHEMA_VERSION:
        raise RuntimeError(
            f"{where} has registry schema {schema}, newer than this version of loraserve understands "
            f"({LEGACY_SCHEMA_VERSION}); upgrade loraserve or use another store root"
        )
    if schema == 0:
        return  # a new file: the revisions create everything
    if schema == 1:
        upgrade_from_v1(conn, configured)
        conn.exec_driver_sql(f"PRAGMA user_version = {LEGACY_SCHEMA_VERSION}")
    command.stamp(cfg, FIRST_REVISION)
