"""Named locks shared by every engine on one database.

On PostgreSQL they are session advisory locks, all held on one connection of
this engine's own: when the engine dies its connection closes and PostgreSQL
frees its locks, so another engine can take over its jobs. SQLite is for one
engine per database: the locks are then this process's own.
"""

from __future__ import annotations

import threading

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine


class Locks:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._mutex = threading.Lock()
        self._held: set[str] = set()
        self._conn: Connection | None = None
        self.shared = engine.dialect.name == "postgresql"

    def _connection(self) -> Connection:
        if self._conn is None:
            self._conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        return self._conn

    def try_lock(self, key: str) -> bool:
        """Take `key` unless this engine or another holds it already."""
        with self._mutex:
            if key in self._held:
                return False
            if self.shared:
                got = self._connection().scalar(
                    text("SELECT pg_try_advisory_lock(hashtextextended(:key, 0))"), {"key": key}
                )
                if not got:
                    return False
            self._held.add(key)
            return True

    def unlock(self, key: str) -> None:
        with self._mutex:
            if key not in self._held:
                return
            self._held.discard(key)
            if self.shared:
                self._connection().execute(
                    text("SELECT pg_advisory_unlock(hashtextextended(:key, 0))"), {"key": key}
                )

    def close(self) -> None:
        with self._mutex:
            if self._conn is not None:
                self._conn.close()  # PostgreSQL frees every lock of the session
                self._conn = None
            self._held.clear()
