"""An export's server process (qemu-nbd or nginx), started detached so that it
outlives the engine, recognised in /proc by the export directory its command
line names; its TLS credentials; and the end of an export (stop, merge back,
delete)."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import stat
from typing import Literal

from thinair.adapters import gnutls, nginx, procfs, qemu_nbd
from thinair.db.models import Export
from thinair.engine.context import EngineContext
from thinair.engine.exports.disk import merge_back
from thinair.engine.exports.urls import DEFAULT_HOST, PSK_IDENTITY, export_dir
from thinair.errors import BackendError, Conflict

log = logging.getLogger("thinair.engine.exports")

NBD_PROGRAMS = frozenset({"qemu-nbd"})
PROGRAMS = NBD_PROGRAMS | nginx.PROGRAMS
# Reads are served from the host's page cache (cache=writeback) by a thread pool
# (aio=threads): twice as fast as O_DIRECT here, and a template exported to many
# VMs is read from memory after the first of them. Never written, so the cache
# cannot hold anything the file does not.
CACHE, AIO = "writeback", "threads"
# GnuTLS's default order put ChaCha20 first for PSK here (215 MiB/s against 580
# with AES-GCM, which CPUs accelerate): the server picks, AES-GCM first, and
# ChaCha20 stays for clients without AES.
TLS_PRIORITY = "NORMAL:%SERVER_PRECEDENCE:-CHACHA20-POLY1305:+CHACHA20-POLY1305"


def _marker(ctx: EngineContext, export_id: str) -> str:
    return f"{export_dir(ctx, export_id)}/"


def _programs(protocol: str) -> frozenset[str]:
    return nginx.PROGRAMS if protocol == "http" else NBD_PROGRAMS


def mine(ctx: EngineContext, e: Export) -> bool:
    """Is the export served from this engine's machine and home?"""
    return e.engine is None or e.engine == ctx.engine_name


def alive(ctx: EngineContext, e: Export) -> bool:
    return e.pid is not None and procfs.matches(e.pid, _programs(e.protocol), _marker(ctx, e.id))


def make_credentials(ctx: EngineContext, e: Export) -> None:
    directory = export_dir(ctx, e.id)
    if e.tls == "psk":
        gnutls.write_psk(directory / "tls", PSK_IDENTITY)
    elif e.tls == "x509":
        host = e.host or DEFAULT_HOST
        names = ["localhost", "127.0.0.1", "::1"]
        if host in ("0.0.0.0", "::"):
            names += [socket.gethostname(), socket.getfqdn()]
        else:
            names.append(host)
        gnutls.make_x509(directory / "tls", directory / "client", names, label=e.name)


def start(ctx: EngineContext, e: Export) -> int:
    """Start the export's server, detached; returns its pid once it listens."""
    directory = export_dir(ctx, e.id)
    host = e.host or DEFAULT_HOST
    if e.socket and stat.S_ISSOCK(_lstat_mode(e.socket)):
        # Left by a server that was killed: this record owns the path.
        os.unlink(e.socket)
    try:
        if e.protocol == "http":
            (directory / "nginx.conf").write_text(
                nginx.config(e.image, e.name, host, e.port or 0, directory)
            )
            return nginx.start(directory)
        tls = None
        if e.tls != "none":
            # Clients of an x509 export must show a certificate of our CA.
            kind: Literal["psk", "x509"] = "psk" if e.tls == "psk" else "x509"
            tls_dir = e.tls_dir or str(directory / "tls")
            tls = qemu_nbd.Tls(kind, tls_dir, priority=TLS_PRIORITY, verify_peer=True)
        server = qemu_nbd.Server(
            e.image,
            fmt=e.format,
            export_name=e.name,
            host=host,
            port=e.port,
            shared=e.shared,
            cache=CACHE,
            aio=AIO,
            unix_socket=e.socket,
            tls=tls,
        )
        return server.start_detached(str(directory / "server.pid"), str(directory / "server.log"))
    except (qemu_nbd.ServerError, nginx.ServerError) as err:
        tool = "nginx" if e.protocol == "http" else "qemu-nbd"
        message = f"{tool} cannot serve {e.image}: {err}"
        if "in use" in str(err) or "lock" in str(err):
            raise Conflict(message) from err
        raise BackendError(message) from err


def _lstat_mode(path: str) -> int:
    try:
        return os.lstat(path).st_mode
    except OSError:
        return 0


def stop(ctx: EngineContext, export_id: str, pid: int | None, protocol: str) -> None:
    """Stop the export's server, and any other process that names its directory
    (one started by an engine that died before it could record the pid)."""
    marker = _marker(ctx, export_id)
    if pid is not None:
        procfs.terminate(pid, _programs(protocol), marker)
    for other in procfs.find(PROGRAMS, marker):
        procfs.terminate(other, PROGRAMS, marker)


def destroy(ctx: EngineContext, export_id: str) -> None:
    """Mark the export removing, stop its server, delete its directory (keys
    included) and socket, and last its record. Idempotent: the reconciler calls
    it again for an export left in phase removing or creating."""
    with ctx.db.session() as s:
        e = s.get(Export, export_id)
        if e is None:
            return
        if e.phase != "creating":
            e.phase = "removing"
        pid, protocol, sock = e.pid, e.protocol, e.socket
    stop(ctx, export_id, pid, protocol)
    merge_back(ctx, e)  # raises, keeping the record, if the VM cannot be put back
    if sock and stat.S_ISSOCK(_lstat_mode(sock)):
        os.unlink(sock)
    shutil.rmtree(export_dir(ctx, export_id), ignore_errors=True)
    with ctx.db.session() as s:
        e = s.get(Export, export_id)
        if e is not None:
            s.delete(e)
    held = ctx.exports_held.pop(export_id, None)
    if held is not None:
        held.close()
