"""A PostgreSQL cluster of the tests' own (Debian's binaries, not its default
cluster): initdb into a directory under /var/tmp, run as the `postgres` user
on a loopback port and a socket directory of its own, removed afterwards."""

from __future__ import annotations

import glob
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg

from thinair.adapters import qemu_nbd


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise FileNotFoundError(f"{name}: install Debian's postgresql package")
    return found[-1]


def _as_postgres(*args: str) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True)


@dataclass
class Cluster:
    root: Path
    port: int

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        self.root.mkdir(mode=0o755, parents=True)
        shutil.chown(self.root, "postgres", "postgres")
        _as_postgres(_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")
        _as_postgres(
            _bin("pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-w",
            "-o",
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=300",
            "start",
        )

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            _as_postgres(_bin("pg_ctl"), "-D", str(self.data), "-w", "-m", "fast", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self) -> str:
        """A fresh, empty database: its SQLAlchemy URL."""
        name = "t" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def start_cluster(parent: Path) -> Cluster:
    cluster = Cluster(parent / f"pg-{uuid.uuid4().hex[:8]}", qemu_nbd.free_port())
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster
