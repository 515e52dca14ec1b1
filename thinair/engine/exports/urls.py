"""An export's paths and the URL a client opens, and the checks of what a user
asks for (paths, image, --listen, socket, TLS directory, name)."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import stat
from pathlib import Path
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from thinair import models
from thinair.adapters import gnutls, nbd_address, qemu_img
from thinair.adapters.errors import CommandFailed
from thinair.adapters.nbd_address import NbdAddress
from thinair.db.models import Export
from thinair.engine import storage
from thinair.engine.context import EngineContext
from thinair.engine.probe import local_image_problem
from thinair.errors import Conflict, InvalidInput
from thinair.external import validate_format

PSK_IDENTITY = "thinair"
DEFAULT_HOST = "127.0.0.1"

# Paths reach nginx's configuration and QEMU's comma-separated --object
# options: plain characters only, no quotes, commas, '$', ';' or spaces.
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/+@%=:-]*$")


def root(ctx: EngineContext) -> Path:
    return ctx.settings.home / "exports"


def export_dir(ctx: EngineContext, export_id: str) -> Path:
    return root(ctx) / export_id


def _public_host(host: str) -> str:
    """The name clients reach a server at: for one listening everywhere, the
    host's name (getfqdn() may say "localhost")."""
    return socket.gethostname() if host in ("0.0.0.0", "::", "") else host


def _url_host(host: str) -> str:
    host = _public_host(host)
    return f"[{host}]" if ":" in host else host


def tls_files(ctx: EngineContext, e: Export) -> dict[str, str | None]:
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
    files = tls_files(ctx, e)
    query = [
        (key, value)
        for key, value in (
            ("tls-psk-file", files["psk_file"]),
            ("tls-certificates", files["tls_certificates"]),
        )
        if value
    ]
    return address(e).url(tls=e.tls != "none", user=files["tls_username"], query=query)


def address(e: Export) -> NbdAddress:
    """Where an NBD export's server listens, as its clients reach it."""
    if e.socket:
        return NbdAddress.unix(e.socket, e.name)
    return NbdAddress.tcp(_public_host(e.host or DEFAULT_HOST), e.port or 0, e.name)


def _check_path(path: str, what: str) -> None:
    if not path.startswith("/"):
        raise InvalidInput(f"{what} must be an absolute path, not {path!r}")
    if not _SAFE_PATH.match(path) or "/../" in path + "/" or "//" in path:
        raise InvalidInput(
            f"bad {what} {path!r}: use a plain absolute path (no spaces, quotes, commas)"
        )


def check_image(ctx: EngineContext, req: models.ExportCreate) -> tuple[str, int]:
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
        raise InvalidInput(f"cannot serve {req.image}: {reason}") from e
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


def parse_listen(text: str | None) -> tuple[str, int | None]:
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
    except ValueError as e:
        raise InvalidInput(f"bad port in --listen {text!r}") from e
    if port is not None and not 0 < port < 65536:
        raise InvalidInput(f"bad port {port} in --listen {text!r}")
    if not re.fullmatch(r"[A-Za-z0-9.:-]+", host):
        raise InvalidInput(f"bad host in --listen {text!r}")
    return host, port


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As the servers do: a port whose old connections linger in TIME_WAIT is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except socket.gaierror as e:
            raise InvalidInput(f"cannot listen on {host}: {e.strerror}") from e
        except OSError as e:
            if e.errno == 98:  # EADDRINUSE
                raise Conflict(f"port {port} on {host} is in use") from e
            raise InvalidInput(f"cannot listen on {host}:{port}: {e.strerror}") from e


def free_port(host: str) -> int:
    try:
        return nbd_address.free_port(host)
    except OSError as e:
        raise InvalidInput(f"cannot listen on {host}: {e.strerror}") from e


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def default_tls(req: models.ExportCreate, host: str) -> Literal["none", "psk", "x509"]:
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


def check_socket_path(ctx: EngineContext, path: str) -> None:
    _check_path(path, "Unix socket path")
    storage.check_image_root(ctx, path, "Unix socket")
    if len(path.encode()) > 107:
        raise InvalidInput(f"Unix socket path {path!r} is longer than 107 bytes")
    if not Path(path).parent.is_dir():
        raise InvalidInput(f"{Path(path).parent} is not an existing directory")
    if os.path.lexists(path):
        raise Conflict(f"{path} exists already")


def check_tls_dir(ctx: EngineContext, req: models.ExportCreate) -> None:
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
            raise InvalidInput(f"TLS file {path} is unreadable: {e.strerror}") from e
        if name == gnutls.PSK_FILE and not re.match(rb"[^:\s]+:[0-9a-fA-F]+$", head, re.M):
            raise InvalidInput(f"{path} is not a psktool key file (identity:hexkey lines)")
        if name.endswith(".pem") and b"-----BEGIN " not in head:
            raise InvalidInput(f"{path} is not a PEM file")


def default_name(s: Session, image: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", Path(image).name.split(".")[0]).lstrip("._-")
    stem = stem[:56] or "export"
    taken = set(s.scalars(select(Export.name).where(Export.name.like(f"{stem}%"))))
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}"
    return name
