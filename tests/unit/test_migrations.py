"""The schema's migrations: the newest one gives what the models describe, and
a database made before blank disks gets them, every disk it has marked as not
blank (they all came from external disks)."""

from __future__ import annotations

import json
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


def test_jobs_from_before_the_cancel_column(tmp_path: Path) -> None:
    check_cancel_column(Database(f"sqlite:///{tmp_path / 'jobs.db'}"))


def _jobs(conn: sa.Connection, columns: str) -> list[tuple[object, ...]]:
    """The jobs' rows, JSON read as JSON (SQLite gives text, PostgreSQL values)."""
    rows = conn.execute(sa.text(f"SELECT id, {columns} FROM jobs ORDER BY id"))
    return [
        tuple(json.loads(v) if isinstance(v, str) and v[:1] == "{" else v for v in r) for r in rows
    ]


def check_cancel_column(db: Database) -> None:
    """0007: a cancel asked for in the params moves to its own column, and a step
    may be longer than 32 characters; the downgrade puts both back as they were.
    (Also run on PostgreSQL by tests/integration/test_postgres.py.)"""
    _run(db, "upgrade", "0006")
    with db.engine.begin() as conn:
        for job_id, params in (("asked", '{"disks": ["d"], "cancel": true}'), ("not", "{}")):
            conn.execute(
                sa.text(
                    "INSERT INTO jobs (id, kind, state, step, params, progress, created_at, "
                    "updated_at) VALUES (:id, 'import', 'running', 'copy', :params, '{}', "
                    "'2026-01-01', '2026-01-01')"
                ),
                {"id": job_id, "params": params},
            )
    db.upgrade()
    long_step = "virt-v2v: Inspecting the source virtual machine"
    with db.engine.begin() as conn:
        assert _jobs(conn, "params, cancel_requested") == [
            ("asked", {"disks": ["d"]}, True),
            ("not", {}, False),
        ]
        conn.execute(sa.text("UPDATE jobs SET step = :step"), {"step": long_step})
    _run(db, "downgrade", "0006")
    with db.engine.connect() as conn:
        columns = {c["name"]: c for c in sa.inspect(conn).get_columns("jobs")}
        assert "cancel_requested" not in columns
        step_type = columns["step"]["type"]
        assert isinstance(step_type, sa.String) and step_type.length == 32
        assert _jobs(conn, "params, step") == [
            ("asked", {"disks": ["d"], "cancel": True}, long_step[:32]),
            ("not", {}, long_step[:32]),
        ]
    db.dispose()
