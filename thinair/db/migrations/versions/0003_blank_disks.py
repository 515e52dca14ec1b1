"""blank disks

Revision ID: 0003_blank_disks
Revises: 0002
Create Date: 2026-11-25 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_blank_disks"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Every disk before this revision came from an external disk.
    op.add_column(
        "disks", sa.Column("blank", sa.Boolean(), nullable=False, server_default=sa.false())
    )


def downgrade() -> None:
    with op.batch_alter_table("disks") as batch:
        batch.drop_column("blank")
