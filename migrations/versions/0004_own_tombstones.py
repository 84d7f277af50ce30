"""tombstones: one table for deleted models, adapters and datasets (app/services/registry.py)

Revision ID: 0004_own_tombstones
Revises: 0003
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_own_tombstones"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "tombstones",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("path_sha256", sa.String(length=64), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("tombstones", schema=None) as batch_op:
        batch_op.create_index("ix_tombstones_kind_path_sha256", ["kind", "path_sha256"], unique=False)
    op.execute(
        "INSERT INTO tombstones (kind, path, path_sha256, deleted_at) "
        "SELECT 'model', path, path_sha256, deleted_at FROM deleted_models"
    )
    with op.batch_alter_table("deleted_models", schema=None) as batch_op:
        batch_op.drop_index("ix_deleted_models_path_sha256")
    op.drop_table("deleted_models")


def downgrade() -> None:
    op.create_table(
        "deleted_models",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("path_sha256", sa.String(length=64), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("deleted_models", schema=None) as batch_op:
        batch_op.create_index("ix_deleted_models_path_sha256", ["path_sha256"], unique=False)
    op.execute(
        "INSERT INTO deleted_models (path, path_sha256, deleted_at) "
        "SELECT path, path_sha256, deleted_at FROM tombstones WHERE kind = 'model'"
    )
    with op.batch_alter_table("tombstones", schema=None) as batch_op:
        batch_op.drop_index("ix_tombstones_kind_path_sha256")
    op.drop_table("tombstones")
