"""The schema's migrations: the newest one gives what the models describe, and
a database made before blank disks gets them, every disk it has marked as not
blank (they all came from external disks)."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from thinair.db.models import Base
from thinair.db.session import Database


def _run(db: Database, fn: str, revision: str) -> None:
    db.migrate(fn, revision)


def test_head_matches_the_models(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'head.db'}")
    db.upgrade()
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    db.dispose()


def test_disks_from_before_blank_disks(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'old.db'}")
    _run(db, "upgrade", "0002")
    with db.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO storage_domains (id, name, path, created_at) "
                "VALUES ('sd', 'sd', '/sd', '2026-01-01')"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO vms (id, name, memory_mib, cpus, phase, domain_type, console_log, "
                "created_at) VALUES ('vm', 'bl-old', 64, 1, 'ready', 'qemu', '', '2026-01-01')"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO disks (id, vm_id, position, target, storage_domain_id, volume_path, "
                "volume_format, virtual_size, external_url) "
                "VALUES ('d', 'vm', 0, 'vda', 'sd', '/sd/d.qcow2', 'qcow2', 1024, 'nbd://h/x')"
            )
        )
    db.upgrade()
    with db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT id, blank FROM disks")).all() == [("d", 0)]
    _run(db, "downgrade", "0002")
    with db.engine.connect() as conn:
        assert "blank" not in [c["name"] for c in sa.inspect(conn).get_columns("disks")]
    db.dispose()
