"""hosts: libvirt hosts (the local one first), which hosts reach a storage
domain, where a VM is defined; the installation's identity, shared by every
engine on one database, and which engine serves an export

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 00:05:00
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LOCAL_HOST_ID = "00000000-0000-0000-0000-000000000001"


def upgrade() -> None:
    op.create_table(
        "installation",
        sa.Column("key", sa.Integer(), nullable=False),
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key"),
        sa.UniqueConstraint("id"),
    )
    hosts = op.create_table(
        "hosts",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("libvirt_uri", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
        sa.UniqueConstraint("libvirt_uri"),
    )
    assert hosts is not None
    op.bulk_insert(
        hosts,
        [
            {
                "id": LOCAL_HOST_ID,
                "name": "local",
                "libvirt_uri": None,
                "created_at": datetime.now(UTC),
            }
        ],
    )
    with op.batch_alter_table("storage_domains") as b:
        b.add_column(sa.Column("host_id", sa.String(length=36), nullable=True))
        b.create_foreign_key("fk_storage_domains_host_id", "hosts", ["host_id"], ["id"])
    with op.batch_alter_table("exports") as b:
        b.add_column(sa.Column("engine", sa.Text(), nullable=True))
    with op.batch_alter_table("vms") as b:
        b.add_column(
            sa.Column("host_id", sa.String(length=36), nullable=False, server_default=LOCAL_HOST_ID)
        )
        b.create_foreign_key("fk_vms_host_id", "hosts", ["host_id"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("exports") as b:
        b.drop_column("engine")
    with op.batch_alter_table("vms") as b:
        b.drop_constraint("fk_vms_host_id", type_="foreignkey")
        b.drop_column("host_id")
    with op.batch_alter_table("storage_domains") as b:
        b.drop_constraint("fk_storage_domains_host_id", type_="foreignkey")
        b.drop_column("host_id")
    op.drop_table("hosts")
    op.drop_table("installation")
