"""jobs: a step of any length (virt-v2v's steps are longer than 32 characters,
which PostgreSQL refused), and a cancel request in a column of its own instead
of a `cancel` key in the params, which a flow's update of its params erased

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 06:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STEP_LENGTH = 32  # before

jobs = sa.table(
    "jobs",
    sa.column("id", sa.String()),
    sa.column("params", sa.JSON()),
    sa.column("cancel_requested", sa.Boolean()),
)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("step", type_=sa.Text(), existing_nullable=False)
        batch.add_column(
            sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    conn = op.get_bind()
    for job_id, params in conn.execute(sa.select(jobs.c.id, jobs.c.params)).all():
        if isinstance(params, dict) and "cancel" in params:
            asked = bool(params.pop("cancel"))
            conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id)
                .values(params=params, cancel_requested=asked)
            )


def downgrade() -> None:
    conn = op.get_bind()
    rows = conn.execute(sa.select(jobs.c.id, jobs.c.params).where(jobs.c.cancel_requested))
    for job_id, params in rows.all():
        conn.execute(
            jobs.update().where(jobs.c.id == job_id).values(params={**params, "cancel": True})
        )
    cut = STEP_LENGTH
    conn.execute(
        sa.text(f"UPDATE jobs SET step = substr(step, 1, {cut}) WHERE length(step) > {cut}")
    )
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("cancel_requested")
        batch.alter_column("step", type_=sa.String(STEP_LENGTH), existing_nullable=False)
