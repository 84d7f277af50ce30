"""models: owner, default flag, tombstones of deleted models

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.add_column(sa.Column("owner", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("is_default", sa.Boolean(), server_default="0", nullable=False))
        batch_op.create_index(batch_op.f("ix_checkpoints_owner"), ["owner"], unique=False)
    # fine-tunes belong to the key that ran the train job; everything else stays shared (owner NULL)
    op.execute(
        "UPDATE checkpoints SET owner = (SELECT jobs.owner FROM jobs WHERE jobs.id = checkpoints.train_job_id) "
        "WHERE train_job_id IS NOT NULL"
    )
    op.create_table(
        "deleted_models",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("path_sha256", sa.String(length=64), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("deleted_models", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_deleted_models_path_sha256"), ["path_sha256"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("deleted_models", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deleted_models_path_sha256"))
    op.drop_table("deleted_models")
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_checkpoints_owner"))
        batch_op.drop_column("is_default")
        batch_op.drop_column("owner")
