"""TLS credentials for an export, in the layouts QEMU and libnbd read.

- PSK: ``keys.psk`` with one ``identity:hexkey`` line (psktool's format), made
  with Python's `secrets`; the same file is the server's and the client's.
- X.509: a throw-away CA (its key is deleted once the certificates are signed,
  so nobody can issue more), a server certificate for the names clients will
  dial and a client certificate, made with certtool (gnutls-bin). The server
  directory holds ca-cert.pem, server-cert.pem, server-key.pem (QEMU's
  tls-creds-x509); the client directory ca-cert.pem, client-cert.pem,
  client-key.pem (libnbd's tls-certificates=DIR, QEMU's client side).

Keys are created 0600 inside 0700 directories and only paths ever reach a
command line. The binary can be overridden with THINAIR_CERTTOOL.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from thinair.adapters._process import run

PSK_FILE = "keys.psk"
X509_SERVER_FILES = ["ca-cert.pem", "server-cert.pem", "server-key.pem"]


def _private_file(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def write_psk(directory: Path, identity: str) -> Path:
    """A new 256-bit pre-shared key for `identity` in DIR/keys.psk."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / PSK_FILE
    _private_file(path, f"{identity}:{secrets.token_hex(32)}\n")
    return path


def certtool() -> str:
    return os.environ.get("THINAIR_CERTTOOL", "certtool")


def _key(path: Path) -> None:
    # ECDSA keys are made in milliseconds where RSA ones take a second or more.
    old = os.umask(0o077)
    try:
        run([certtool(), "--generate-privkey", "--key-type=ecdsa", "--outfile", str(path)])
    finally:
        os.umask(old)
    os.chmod(path, 0o600)


def _template(path: Path, lines: Iterable[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def make_x509(server_dir: Path, client_dir: Path, names: Iterable[str], label: str) -> None:
    """A CA, a server certificate valid for `names` (host names or IP addresses)
    and a client certificate signed by it; the CA's key is deleted afterwards."""
    for d in (server_dir, client_dir):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_key, ca_cert = server_dir / "ca-key.pem", server_dir / "ca-cert.pem"
    try:
        _key(ca_key)
        ca_info = _template(
            server_dir / "ca.info",
            [
                f'cn = "thinair export {label} CA"',
                "ca",
                "cert_signing_key",
                "expiration_days = 3650",
            ],
        )
        run(
            [certtool(), "--generate-self-signed", "--load-privkey", str(ca_key)]
            + ["--template", str(ca_info), "--outfile", str(ca_cert)]
        )
        sans = []
        for name in dict.fromkeys(names):
            try:
                ipaddress.ip_address(name)
                sans.append(f"ip_address = {name}")
            except ValueError:
                sans.append(f'dns_name = "{name}"')
        for role, directory, usage in (
            ("server", server_dir, "tls_www_server"),
            ("client", client_dir, "tls_www_client"),
        ):
            key = directory / f"{role}-key.pem"
            _key(key)
            info = _template(
                server_dir / f"{role}.info",
                [
                    f'cn = "thinair export {label} {role}"',
                    *(sans if role == "server" else []),
                    usage,
                    "signing_key",
                    "encryption_key",
                    "expiration_days = 3650",
                ],
            )
            run(
                [certtool(), "--generate-certificate", "--load-privkey", str(key)]
                + ["--load-ca-certificate", str(ca_cert), "--load-ca-privkey", str(ca_key)]
                + ["--template", str(info), "--outfile", str(directory / f"{role}-cert.pem")]
            )
        (client_dir / "ca-cert.pem").write_bytes(ca_cert.read_bytes())
    finally:
        for leftover in ("ca-key.pem", "ca.info", "server.info", "client.info"):
            (server_dir / leftover).unlink(missing_ok=True)
