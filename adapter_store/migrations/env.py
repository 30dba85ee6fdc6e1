"""Alembic's environment for the registry: the caller's connection, or ``-x url=...`` from the command line."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from adapter_store.schema import metadata


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


_given = context.config.attributes.get("connection")
if _given is not None:
    _run(_given)
else:
    _url = context.get_x_argument(as_dictionary=True).get("url")
    if _url is None:
        raise SystemExit("give the registry database: alembic ... -x url=sqlite:////path/registry.sqlite3")
    with create_engine(_url).connect() as _conn:
        _run(_conn)
        _conn.commit()
