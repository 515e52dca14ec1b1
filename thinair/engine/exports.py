"""Exports: serve an image read-only over NBD (qemu-nbd) or HTTP (nginx), with
TLS where asked, from a server process that outlives the engine.

Each export is a record (written first, phase creating) that owns a directory
THINAIR_HOME/exports/ID (0700: pid file, server log, TLS keys, nginx
configuration) and one server process. The process's command line names that
directory, which is how the engine recognises it after a restart: a live one
is adopted, a dead one started again on the same address, and a process whose
record is gone is stopped. Processes that do not name a directory under this
THINAIR_HOME's exports are never touched.

An export of a running VM's disk (vm and disk instead of an image) freezes the
disk's volume behind a new overlay (a libvirt disk-only snapshot: the guest
writes there from then on) and serves the frozen volume; removing the export
merges the overlay back (block commit) so the VM is on its own volume again.
The VM is held busy meanwhile: no stop, import or rollback until then.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import shutil
import socket
import stat
import threading
import xml.etree.ElementTree as ET
from contextlib import ExitStack
from pathlib import Path
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from thinair import models
from thinair.adapters import gnutls, nginx, procfs, qemu_img, qemu_nbd, snapshot
from thinair.adapters._process import CommandFailed
from thinair.db import refs
from thinair.db.models import Disk, Export, Vm, aware, new_id
from thinair.engine import machines, storage
from thinair.engine.context import EngineContext
from thinair.engine.faults import crash_point
from thinair.engine.probe import local_image_problem
from thinair.errors import BackendError, Conflict, InvalidInput, NotFound, ThinairError
from thinair.external import validate_format

log = logging.getLogger(__name__)

NBD_PROGRAMS = frozenset({"qemu-nbd"})
PROGRAMS = NBD_PROGRAMS | nginx.PROGRAMS
PSK_IDENTITY = "thinair"
DEFAULT_HOST = "127.0.0.1"
# Reads are served from the host's page cache (cache=writeback) by a thread pool
# (aio=threads): twice as fast as O_DIRECT here, and a template exported to many
# VMs is read from memory after the first of them. Never written, so the cache
# cannot hold anything the file does not.
CACHE, AIO = "writeback", "threads"
# GnuTLS's default order put ChaCha20 first for PSK here (215 MiB/s against 580
# with AES-GCM, which CPUs accelerate): the server picks, AES-GCM first, and
# ChaCha20 stays for clients without AES.
TLS_PRIORITY = "NORMAL:%SERVER_PRECEDENCE:-CHACHA20-POLY1305:+CHACHA20-POLY1305"

# Paths reach nginx's configuration and QEMU's comma-separated --object
# options: plain characters only, no quotes, commas, '$', ';' or spaces.
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/+@%=:-]*$")
_ID_IN_PATH = re.compile(r"/exports/([0-9a-f-]{36})/")

# One create or remove at a time: names and ports are chosen under it.
_lock = threading.Lock()
# The VMs held busy by exports of their disks, by export id.
_held: dict[str, ExitStack] = {}


def root(ctx: EngineContext) -> Path:
    return ctx.settings.home / "exports"


def export_dir(ctx: EngineContext, export_id: str) -> Path:
    return root(ctx) / export_id


def _marker(ctx: EngineContext, export_id: str) -> str:
    return f"{export_dir(ctx, export_id)}/"


def _programs(protocol: str) -> frozenset[str]:
    return nginx.PROGRAMS if protocol == "http" else NBD_PROGRAMS


# -- reading -----------------------------------------------------------------


def find(s: Session, ref: str) -> Export:
    """By name, id or a unique prefix of its id."""
    return refs.find(s, Export, ref, "export", list_existing=True)


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        # Listening everywhere: the host's name (getfqdn() may say "localhost").
        host = socket.gethostname()
    return f"[{host}]" if ":" in host else host


def _tls_files(ctx: EngineContext, e: Export) -> dict[str, str | None]:
    files: dict[str, str | None] = {
        "tls_username": None,
        "psk_file": None,
        "ca_cert": None,
        "tls_certificates": None,
    }
    server_dir = Path(e.tls_dir) if e.tls_dir else export_dir(ctx, e.id) / "tls"
    if e.tls == "psk":
        files["psk_file"] = str(server_dir / gnutls.PSK_FILE)
        files["tls_username"] = PSK_IDENTITY if not e.tls_dir else _psk_identity(server_dir)
    elif e.tls == "x509":
        files["ca_cert"] = str(server_dir / "ca-cert.pem")
        if not e.tls_dir:
            files["tls_certificates"] = str(export_dir(ctx, e.id) / "client")
    return files


def _psk_identity(directory: Path) -> str | None:
    try:
        first = (directory / gnutls.PSK_FILE).read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return first.partition(":")[0]


def url(ctx: EngineContext, e: Export) -> str:
    """What a client opens: for TLS a libnbd URI that names the files it needs,
    so `nbdinfo URL` or `nbdcopy URL out.raw` work as printed."""
    if e.protocol == "http":
        return f"http://{_url_host(e.host or DEFAULT_HOST)}:{e.port}/{e.name}"
    files = _tls_files(ctx, e)
    scheme = "nbds" if e.tls != "none" else "nbd"
    user = f"{files['tls_username']}@" if files["tls_username"] else ""
    query: list[str] = []
    if e.socket:
        address = f"{scheme}+unix://{user}/{e.name}"
        query.append(f"socket={e.socket}")
    else:
        address = f"{scheme}://{user}{_url_host(e.host or DEFAULT_HOST)}:{e.port}/{e.name}"
    if files["psk_file"]:
        query.append(f"tls-psk-file={files['psk_file']}")
    if files["tls_certificates"]:
        query.append(f"tls-certificates={files['tls_certificates']}")
    return address + ("?" + "&".join(query) if query else "")


def _alive(ctx: EngineContext, e: Export) -> bool:
    return e.pid is not None and procfs.matches(e.pid, _programs(e.protocol), _marker(ctx, e.id))


def to_model(ctx: EngineContext, e: Export) -> models.Export:
    # Another engine's server runs on its machine: what its record says, no more.
    running = _alive(ctx, e) if mine(ctx, e) else e.phase == "ready" and e.error is None
    clients = bytes_read = None
    if running and e.pid is not None and mine(ctx, e):
        clients = procfs.unix_clients(e.socket) if e.socket else procfs.tcp_clients(e.port or 0)
        if e.protocol == "nbd":
            bytes_read = procfs.bytes_read(e.pid)
    return models.Export(
        id=e.id,
        name=e.name,
        image=e.image,
        format=e.format,
        virtual_size=e.virtual_size,
        protocol=e.protocol,  # type: ignore[arg-type]
        url=url(ctx, e),
        host=e.host,
        port=e.port,
        socket=e.socket,
        tls=e.tls,  # type: ignore[arg-type]
        vm_id=e.vm_id,
        disk=e.disk,
        state="running" if running else "stopped",
        phase=e.phase,
        pid=e.pid if running else None,
        clients=clients,
        bytes_read=bytes_read,
        error=e.error,
        created_at=aware(e.created_at),
        engine=e.engine,
        warning=exposure_warning(e),
        **_tls_files(ctx, e),
    )


def list_all(ctx: EngineContext) -> list[models.Export]:
    with ctx.db.session() as s:
        return [to_model(ctx, e) for e in s.scalars(select(Export).order_by(Export.name))]


def get(ctx: EngineContext, ref: str) -> models.Export:
    with ctx.db.session() as s:
        return to_model(ctx, find(s, ref))


# -- checking input ----------------------------------------------------------


def _check_path(path: str, what: str) -> None:
    if not path.startswith("/"):
        raise InvalidInput(f"{what} must be an absolute path, not {path!r}")
    if not _SAFE_PATH.match(path) or "/../" in path + "/" or "//" in path:
        raise InvalidInput(
            f"bad {what} {path!r}: use a plain absolute path (no spaces, quotes, commas)"
        )


def _check_image(ctx: EngineContext, req: models.ExportCreate) -> tuple[str, int]:
    """The image's format and virtual size; InvalidInput if it cannot be served."""
    assert req.image is not None
    _check_path(req.image, "image path")
    storage.check_image_root(ctx, req.image)  # first: nothing outside is even looked at
    validate_format(req.format)
    if problem := local_image_problem(req.image):
        raise InvalidInput(problem)
    try:
        info = qemu_img.info(req.image, fmt=req.format, timeout=60, backing_chain=True)
    except CommandFailed as e:
        line = e.stderr.splitlines()[-1] if e.stderr else str(e)
        reason = line.split(": ", 2)[-1] if line.startswith("qemu-img:") else line
        raise InvalidInput(f"cannot serve {req.image}: {reason}") from None
    if info.virtual_size <= 0:
        raise InvalidInput(f"{req.image} is empty")
    for name in info.files()[1:]:  # a backing file or extent: the server opens it too
        if not name.startswith("/"):
            raise InvalidInput(f"{req.image} names {name!r}, not a local path")
        storage.check_image_root(ctx, name, "file")
    if req.protocol == "http" and os.geteuid() == 0:
        _check_readable_by_others(Path(req.image))
    return info.format, info.virtual_size


def _check_readable_by_others(path: Path) -> None:
    # nginx's workers run as nobody: they must be able to open the file.
    if not path.stat().st_mode & stat.S_IROTH:
        raise InvalidInput(f"{path} is not readable by others (nginx serves it as nobody)")
    for parent in path.parents:
        if not parent.stat().st_mode & stat.S_IXOTH:
            raise InvalidInput(
                f"{parent} is not searchable by others (nginx serves {path} as nobody)"
            )


def _parse_listen(text: str | None) -> tuple[str, int | None]:
    if not text:
        return DEFAULT_HOST, None
    host, port_text = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    host = host or DEFAULT_HOST
    try:
        port = int(port_text) if port_text else None
    except ValueError:
        raise InvalidInput(f"bad port in --listen {text!r}") from None
    if port is not None and not 0 < port < 65536:
        raise InvalidInput(f"bad port {port} in --listen {text!r}")
    if not re.fullmatch(r"[A-Za-z0-9.:-]+", host):
        raise InvalidInput(f"bad host in --listen {text!r}")
    return host, port


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As the servers do: a port whose old connections linger in TIME_WAIT is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except socket.gaierror as e:
            raise InvalidInput(f"cannot listen on {host}: {e.strerror}") from None
        except OSError as e:
            if e.errno == 98:  # EADDRINUSE
                raise Conflict(f"port {port} on {host} is in use") from None
            raise InvalidInput(f"cannot listen on {host}:{port}: {e.strerror}") from None


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, 0))
        except OSError as e:
            raise InvalidInput(f"cannot listen on {host}: {e.strerror}") from None
        return int(s.getsockname()[1])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def _default_tls(req: models.ExportCreate, host: str) -> Literal["none", "psk", "x509"]:
    """TLS unless asked otherwise wherever the network reaches the server."""
    if req.tls is not None:
        return req.tls
    if req.protocol == "nbd" and req.unix is None and not is_loopback(host):
        return "psk"
    return "none"


def exposure_warning(e: Export) -> str | None:
    """What a plain export beyond loopback means, for the CLI, the API and the UI."""
    if e.tls != "none" or e.socket is not None or e.host is None or is_loopback(e.host):
        return None
    return (
        f"plain {e.protocol.upper()} on {e.host}:{e.port}: anyone on the network who can "
        "reach this port can read the whole disk; firewall it, or use --tls psk"
    )


def _check_socket_path(ctx: EngineContext, path: str) -> None:
    _check_path(path, "Unix socket path")
    storage.check_image_root(ctx, path, "Unix socket")
    if len(path.encode()) > 107:
        raise InvalidInput(f"Unix socket path {path!r} is longer than 107 bytes")
    if not Path(path).parent.is_dir():
        raise InvalidInput(f"{Path(path).parent} is not an existing directory")
    if os.path.lexists(path):
        raise Conflict(f"{path} exists already")


def _check_tls_dir(ctx: EngineContext, req: models.ExportCreate) -> None:
    if req.tls_dir is None:
        return
    if req.tls == "none":
        raise InvalidInput("--tls-dir needs --tls psk or --tls x509")
    _check_path(req.tls_dir, "TLS directory")
    storage.check_image_root(ctx, req.tls_dir, "TLS directory")
    names = [gnutls.PSK_FILE] if req.tls == "psk" else gnutls.X509_SERVER_FILES
    for name in names:
        path = Path(req.tls_dir) / name
        try:
            with open(path, "rb") as f:
                head = f.read(4096)
        except OSError as e:
            raise InvalidInput(f"TLS file {path} is unreadable: {e.strerror}") from None
        if name == gnutls.PSK_FILE and not re.match(rb"[^:\s]+:[0-9a-fA-F]+$", head, re.M):
            raise InvalidInput(f"{path} is not a psktool key file (identity:hexkey lines)")
        if name.endswith(".pem") and b"-----BEGIN " not in head:
            raise InvalidInput(f"{path} is not a PEM file")


def _default_name(s: Session, image: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", Path(image).name.split(".")[0]).lstrip("._-")
    stem = stem[:56] or "export"
    taken = set(s.scalars(select(Export.name).where(Export.name.like(f"{stem}%"))))
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}"
    return name


# -- the server process --------------------------------------------------------


def _start(ctx: EngineContext, e: Export) -> int:
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
        objects: list[str] = []
        creds = None
        if e.tls != "none":
            tls_dir = e.tls_dir or str(directory / "tls")
            kind = "tls-creds-psk" if e.tls == "psk" else "tls-creds-x509"
            # QEMU reads the keys from the directory: no key on the command line.
            spec = f"{kind},id=tls0,endpoint=server,dir={tls_dir},priority={TLS_PRIORITY}"
            if e.tls == "x509":
                spec += ",verify-peer=on"  # clients must show a certificate of our CA
            objects.append(spec)
            creds = "tls0"
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
            objects=objects,
            tls_creds=creds,
        )
        return server.start_detached(str(directory / "server.pid"), str(directory / "server.log"))
    except (qemu_nbd.ServerError, nginx.ServerError) as err:
        tool = "nginx" if e.protocol == "http" else "qemu-nbd"
        message = f"{tool} cannot serve {e.image}: {err}"
        if "in use" in str(err) or "lock" in str(err):
            raise Conflict(message) from None
        raise BackendError(message) from None


def _lstat_mode(path: str) -> int:
    try:
        return os.lstat(path).st_mode
    except OSError:
        return 0


def _stop(ctx: EngineContext, export_id: str, pid: int | None, protocol: str) -> None:
    """Stop the export's server, and any other process that names its directory
    (one started by an engine that died before it could record the pid)."""
    marker = _marker(ctx, export_id)
    if pid is not None:
        procfs.terminate(pid, _programs(protocol), marker)
    for other in procfs.find(PROGRAMS, marker):
        procfs.terminate(other, PROGRAMS, marker)


def _destroy(ctx: EngineContext, export_id: str) -> None:
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
    _stop(ctx, export_id, pid, protocol)
    _merge_back(ctx, e)  # raises, keeping the record, if the VM cannot be put back
    if sock and stat.S_ISSOCK(_lstat_mode(sock)):
        os.unlink(sock)
    shutil.rmtree(export_dir(ctx, export_id), ignore_errors=True)
    with ctx.db.session() as s:
        e = s.get(Export, export_id)
        if e is not None:
            s.delete(e)
    held = _held.pop(export_id, None)
    if held is not None:
        held.close()


def _merge_back(ctx: EngineContext, e: Export) -> None:
    """Put a VM whose disk was frozen for this export back on its own volume:
    commit the overlay the guest wrote to since into it, then delete the overlay.
    Idempotent: does only what the domain's chain shows is still to do."""
    if not (e.vm_id and e.disk and e.snapshot_path):
        return
    with ctx.db.session() as s:
        vm = s.get(Vm, e.vm_id)
        name = vm.name if vm is not None else None
    if name is not None and ctx.vm_virt(name).state(name) != "missing":
        chain = ctx.vm_virt(name).disk_chain(name, e.disk)
        if chain and chain[0] == e.snapshot_path:
            if ctx.vm_virt(name).state(name) in ("running", "paused"):
                snapshot.merge_back(ctx.vm_virt(name), name, e.disk, e.image)
            else:
                snapshot.merge_back_offline(e.snapshot_path)
        if _configured_top(ctx, name, e.disk) != e.image:
            # The definition for the next boot still names the overlay.
            assert e.vm_id is not None
            machines.redefine(ctx, e.vm_id)
        log.info("merged %s %s back into %s", name, e.disk, e.image)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(e.snapshot_path)


def _configured_top(ctx: EngineContext, name: str, target: str) -> str | None:
    root_el = ET.fromstring(ctx.vm_virt(name).xml(name, inactive=True))
    for disk in root_el.iterfind("devices/disk"):
        tgt, src = disk.find("target"), disk.find("source")
        if tgt is not None and tgt.get("dev") == target and src is not None:
            return src.get("file")
    return None


# -- flows -------------------------------------------------------------------


def _make_credentials(ctx: EngineContext, e: Export) -> None:
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


def _vm_disk(
    ctx: EngineContext, req: models.ExportCreate, hold: ExitStack
) -> tuple[str, str, str, int]:
    """The running VM's disk to freeze: (vm id, volume path, format, size); the VM
    is held busy in `hold` from here on."""
    assert req.vm is not None
    target = req.disk or "vda"
    with ctx.db.session() as s:
        vm = machines.find(s, req.vm)
        disk = next((d for d in vm.disks if d.target == target), None)
        if disk is None:
            raise NotFound(f"VM {vm.name!r} has no disk {target!r}")
        vm_id, name, phase = vm.id, vm.name, vm.phase
        volume, fmt, size = disk.volume_path, disk.volume_format, disk.virtual_size
        # The guest's writes go to a new overlay beside the volume meanwhile.
        storage.check_space(ctx, disk.storage_domain)
    if phase != "ready":
        raise Conflict(f"VM {name!r} is {phase}")
    hold.enter_context(ctx.vm_busy(vm_id, f"an export of its disk {target}"))
    if ctx.vm_virt(name).state(name) not in ("running", "paused"):
        raise Conflict(
            f"VM {name!r} is not running: nothing writes to {target}, expose its volume "
            f"{volume} itself"
        )
    if ctx.vm_virt(name).disk_chain(name, target)[0] != volume:
        raise Conflict(f"VM {name!r} {target} is not on its volume {volume} now")
    return vm_id, volume, fmt, size


def create(ctx: EngineContext, req: models.ExportCreate) -> models.Export:
    """Check everything, then record the export, make its keys and start its server."""
    if (req.image is None) == (req.vm is None):
        raise InvalidInput("give either an image or a VM (--vm NAME --disk vda)")
    if req.disk is not None and req.vm is None:
        raise InvalidInput("--disk goes with --vm")
    hold = ExitStack()
    try:
        return _create(ctx, req, hold)
    except BaseException:
        hold.close()
        raise


def _create(ctx: EngineContext, req: models.ExportCreate, hold: ExitStack) -> models.Export:
    vm_id = None
    if req.vm is not None:
        if req.protocol == "http":
            raise InvalidInput("a VM's disk is exposed over NBD only (its volume is a layer)")
        vm_id, image, fmt, size = _vm_disk(ctx, req, hold)
    else:
        assert req.image is not None
        image = req.image
        fmt, size = _check_image(ctx, req)
    host, port = _parse_listen(req.listen)
    req = req.model_copy(update={"tls": _default_tls(req, host)})
    _check_tls_dir(ctx, req)
    if req.unix is not None:
        if req.listen:
            raise InvalidInput("give --listen or --unix, not both")
        if req.protocol == "http":
            raise InvalidInput("HTTP exports listen on TCP: use --listen, not --unix")
        _check_socket_path(ctx, req.unix)
    if req.protocol == "http" and req.tls != "none":
        raise InvalidInput("HTTP exports are plain HTTP: use --tls none, or NBD for TLS")
    with _lock:
        with ctx.db.session() as s:
            if req.name is not None and s.scalar(select(Export).where(Export.name == req.name)):
                raise Conflict(f"export name {req.name!r} is taken")
            if req.unix is None:
                if port is None:
                    port = _free_port(host)
                else:
                    owner = s.scalar(select(Export).where(Export.port == port))
                    if owner is not None:
                        raise Conflict(f"port {port} belongs to export {owner.name!r}")
                _check_port_free(host, port)
            elif s.scalar(select(Export).where(Export.socket == req.unix)):
                raise Conflict(f"{req.unix} belongs to another export")
            export_id = new_id()
            record = Export(
                id=export_id,
                engine=ctx.engine_name,
                name=req.name
                or _default_name(s, f"{req.vm}-{req.disk or 'vda'}" if req.vm else image),
                image=image,
                format=fmt,
                virtual_size=size,
                protocol=req.protocol,
                host=None if req.unix else host,
                port=None if req.unix else port,
                socket=req.unix,
                tls=req.tls,
                tls_dir=req.tls_dir,
                shared=req.shared,
                vm_id=vm_id,
                disk=(req.disk or "vda") if vm_id else None,
                snapshot_path=f"{image}.exposed-{export_id[:8]}" if vm_id else None,
                phase="creating",
            )
            s.add(record)
        if vm_id is not None:
            _held[record.id] = hold.pop_all()
        try:
            root(ctx).mkdir(mode=0o700, exist_ok=True)
            export_dir(ctx, record.id).mkdir(mode=0o700)
            if record.vm_id is not None:
                _freeze(ctx, record)
                crash_point("expose-frozen")
            _make_credentials(ctx, record)
            pid = _start(ctx, record)
            crash_point("expose-started")
            with ctx.db.session() as s:
                e = s.get(Export, record.id)
                assert e is not None
                e.pid, e.phase = pid, "ready"
        except BaseException as err:
            log.info("export of %s failed, undoing: %s", image, err)
            _destroy(ctx, record.id)
            if isinstance(err, CommandFailed):
                raise BackendError(f"cannot make TLS credentials: {err}") from None
            raise
    log.info("exported %s as %s (pid %d)", image, record.name, pid)
    return get(ctx, record.id)


def _freeze(ctx: EngineContext, e: Export) -> None:
    assert e.vm_id is not None and e.disk is not None and e.snapshot_path is not None
    with ctx.db.session() as s:
        vm = s.get(Vm, e.vm_id)
        assert vm is not None
        name = vm.name
    snapshot.freeze(ctx.vm_virt(name), name, e.disk, e.snapshot_path)
    log.info(
        "froze %s %s at %s; the guest writes to %s now", name, e.disk, e.image, e.snapshot_path
    )


def mine(ctx: EngineContext, e: Export) -> bool:
    """Is the export served from this engine's machine and home?"""
    return e.engine is None or e.engine == ctx.engine_name


def remove(ctx: EngineContext, ref: str) -> None:
    """Stop the export's server and delete everything it owned."""
    with ctx.db.session() as s:
        e = find(s, ref)
        if not mine(ctx, e):
            raise Conflict(
                f"export {e.name} is served by the engine at {e.engine}: remove it there"
            )
        export_id = e.id
    with _lock:
        _destroy(ctx, export_id)


def release(ctx: EngineContext, urls: set[str]) -> list[str]:
    """Stop this engine's exports of `urls` that no external disk reads any more
    (an import has made them local). Returns the ids stopped."""
    with ctx.db.session() as s:
        in_use = {d.external_url for d in s.scalars(select(Disk)) if d.external_url}
        unused = [
            e.id
            for e in s.scalars(select(Export))
            if e.vm_id is None and mine(ctx, e) and url(ctx, e) in urls - in_use
        ]
    for export_id in unused:
        log.info("import done: stopping export %s, which nothing reads any more", export_id)
        remove(ctx, export_id)
    return unused


def reconcile(ctx: EngineContext) -> list[str]:
    """On engine start: finish or undo half-done flows, adopt live servers, start
    dead ones again on the same address, stop servers and delete directories that
    have no record. Returns what it did, one line per action."""
    actions: list[str] = []
    with ctx.db.session() as s:
        records = [e for e in s.scalars(select(Export)) if mine(ctx, e)]
    for e in records:
        if e.phase in ("creating", "removing"):
            try:
                _destroy(ctx, e.id)
            except ThinairError as err:
                actions.append(f"could not finish removing export {e.name}: {err.message}")
                continue
            actions.append(
                f"{'undid export' if e.phase == 'creating' else 'removed export'} {e.name}"
            )
        else:
            if _alive(ctx, e):
                actions.append(f"adopted export {e.name} (pid {e.pid})")
            else:
                _restart(ctx, e, actions)
            if e.vm_id is not None and e.id not in _held:
                # The VM is on the export's overlay still: keep other flows off it.
                hold = ExitStack()
                hold.enter_context(ctx.vm_busy(e.vm_id, f"an export of its disk {e.disk}"))
                _held[e.id] = hold
    with ctx.db.session() as s:
        kept = set(s.scalars(select(Export.id)))
    for pid, command in procfs.find(PROGRAMS, f"{root(ctx)}/").items():
        found = _ID_IN_PATH.search(command)
        if found and found.group(1) not in kept:
            procfs.terminate(pid, PROGRAMS, f"{root(ctx)}/{found.group(1)}/")
            actions.append(f"stopped export process {pid} that has no record")
    if root(ctx).is_dir():
        for directory in root(ctx).iterdir():
            if directory.name not in kept:
                shutil.rmtree(directory, ignore_errors=True)
                actions.append(f"deleted export directory {directory.name} that has no record")
    return actions


def _restart(ctx: EngineContext, e: Export, actions: list[str]) -> None:
    # A server left by an engine that died mid-start may hold the port.
    _stop(ctx, e.id, None, e.protocol)
    try:
        pid = _start(ctx, e)
    except (Conflict, BackendError) as err:
        with ctx.db.session() as s:
            record = s.get(Export, e.id)
            if record is not None:
                record.pid, record.error = None, err.message
        actions.append(f"could not start export {e.name} again: {err.message}")
        return
    with ctx.db.session() as s:
        record = s.get(Export, e.id)
        if record is not None:
            record.pid, record.error = pid, None
    actions.append(f"started export {e.name} again (pid {pid})")
