"""Opening the database and bringing its schema up to date through Alembic."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from thinair.db.locks import Locks

MIGRATIONS = Path(__file__).parent / "migrations"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def normalize_url(url: str) -> str:
    """`postgresql://` means psycopg 3 (the driver thinair installs), not psycopg2."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


@contextmanager
def _committed(s: Session) -> Iterator[None]:
    """Commit on success, roll back on error."""
    try:
        yield
        s.commit()
    except BaseException:
        s.rollback()
        raise


class Database:
    def __init__(self, url: str) -> None:
        self.url = normalize_url(url)
        if self.url.startswith("sqlite"):
            self.engine: Engine = create_engine(self.url, future=True)
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            # Many VMs at once hold many sessions; check connections before use so an
            # engine survives a database restart.
            self.engine = create_engine(
                self.url, future=True, pool_size=10, max_overflow=30, pool_pre_ping=True
            )
        self.locks = Locks(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def upgrade(self) -> None:
        self.migrate("upgrade", "head")

    def migrate(self, command_name: str, revision: str) -> None:
        """Run Alembic's upgrade or downgrade to `revision` on this database."""
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.attributes["connection_url"] = self.url
        sqlite = self.engine.dialect.name == "sqlite"
        with self.engine.connect() as conn:
            if sqlite:
                # Batch migrations copy a table and drop the old one, which fails
                # while other tables' foreign keys point at it; the pragma only
                # takes effect outside a transaction (Alembic's batch mode notes).
                conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
                conn.commit()
            with conn.begin():
                if self.engine.dialect.name == "postgresql":
                    # Engines starting together on one database migrate it one at a time.
                    conn.execute(
                        text("SELECT pg_advisory_xact_lock(hashtextextended('thinair', 0))")
                    )
                cfg.attributes["connection"] = conn
                getattr(command, command_name)(cfg, revision)
            if sqlite:
                problems = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()
                if problems:
                    raise RuntimeError(f"migration left broken foreign keys: {problems}")

    @contextmanager
    def session(self, durable: bool = True) -> Iterator[Session]:
        """A session that commits on success and rolls back on error.

        durable=False: for what may be lost with the host (a job's progress,
        written every half second): the commit does not wait for the disk. A
        sync per commit flushes the host's write cache, under an import's copy
        too (measured: its disk busy half again as long). The database stays
        consistent; only such commits may be missing after a power loss."""
        if durable:
            with self._sessions() as s, _committed(s):
                yield s
            return
        sqlite = self.engine.dialect.name == "sqlite"
        with self.engine.connect() as conn:
            # Per connection in SQLite (WAL: no sync at commit), per transaction
            # in PostgreSQL.
            if sqlite:
                was = conn.exec_driver_sql("PRAGMA synchronous").scalar_one()
                conn.exec_driver_sql("PRAGMA synchronous=NORMAL")
            else:
                conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
            try:
                # control_fully: the session's commit is the connection's.
                with (
                    Session(
                        bind=conn, expire_on_commit=False, join_transaction_mode="control_fully"
                    ) as s,
                    _committed(s),
                ):
                    yield s
            finally:
                if sqlite:
                    conn.exec_driver_sql(f"PRAGMA synchronous={int(was)}")

    def dispose(self) -> None:
        self.locks.close()
        self.engine.dispose()
