"""The registry as schema 2 (``PRAGMA user_version`` 2) left it: adapters, versions, aliases, health.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql, sqlite

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _real() -> sa.Float:
    return sa.Float().with_variant(sqlite.REAL(), "sqlite")


def _digest() -> sa.Column:
    return sa.Column("digest", sa.Text().with_variant(postgresql.TEXT(collation="C"), "postgresql"), nullable=False)


def upgrade() -> None:
    op.create_table(
        "adapters",
        sa.Column("name", sa.Text(), primary_key=True),
        sa.Column("created_at", _real(), nullable=False),
        sa.Column("tenant", sa.Text()),
    )
    op.create_table(
        "versions",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.Text(), nullable=False),
        _digest(),
        sa.Column("base_model", sa.Text(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("alpha", _real(), nullable=False),
        sa.Column("target_modules", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("created_at", _real(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("tags", sa.Text(), nullable=False),
        sa.Column("pinned", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("legacy_digest", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.ForeignKeyConstraint(["name"], ["adapters.name"]),
        sa.UniqueConstraint("name", "digest"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "aliases",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("alias", sa.Text(), nullable=False),
        _digest(),
        sa.Column("updated_at", _real(), nullable=False),
        sa.PrimaryKeyConstraint("name", "alias"),
        sa.ForeignKeyConstraint(
            ["name", "digest"], ["versions.name", "versions.digest"], deferrable=True, initially="IMMEDIATE"
        ),
    )
    op.create_table(
        "health",
        sa.Column("name", sa.Text(), nullable=False),
        _digest(),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text()),
        sa.Column("checked_at", _real()),
        sa.Column("latency_s", _real()),
        sa.PrimaryKeyConstraint("name", "digest"),
        sa.ForeignKeyConstraint(
            ["name", "digest"],
            ["versions.name", "versions.digest"],
            ondelete="CASCADE",
            deferrable=True,
            initially="IMMEDIATE",
        ),
    )


def downgrade() -> None:
    for table in ("health", "aliases", "versions", "adapters"):
        op.drop_table(table)
