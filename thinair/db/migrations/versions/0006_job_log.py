"""job log: a job's steps and states with their times, and samples of the bytes
done, kept after it ends (the task log of `thinair jobs show` and the web UI)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 02:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A job from before has no log: an empty one.
    op.add_column(
        "jobs", sa.Column("log", sa.JSON(), nullable=False, server_default=sa.text("'[]'"))
    )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("log")
