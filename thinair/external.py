"""External disks: parsing and checking the URLs users give for them.

An external disk is data at a URL thinair does not own, given as QEMU reads it:
``nbd://host[:port]/export``, ``nbd+unix:///export?socket=/path``, ``nbds://``
(TLS; libnbd's ``?tls-psk-file=PATH`` or ``?tls-certificates=DIR``), ``http(s)://``,
``ftp(s)://``, ``ssh://[user@]host[:port]/path`` or a local absolute path. The
check here is syntactic only (no I/O); ``probe`` in the engine asks the server.

A disk inside a tar file (an OVA's) is ``tar+file:///path/x.ova#ENTRY``,
``tar+http://host/x.ova#ENTRY`` or ``tar+https://...#ENTRY``: QEMU reads it
through a local nbdkit with its tar filter (see thinair.engine.bridges), so the
disk is never unpacked. ENTRY is the member's name, percent-encoded.

A ``--disk`` option is ``URL[,format=F][,storage=SD][,check-readonly=off]``;
``,,`` stands for a literal comma, as in QEMU's own option syntax.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from thinair.errors import InvalidInput

NBD_DEFAULT_PORT = 10809

# Formats qemu-img reads that make sense as a VM disk.
FORMATS = frozenset(
    {"raw", "qcow2", "qcow", "vmdk", "vhdx", "vpc", "vdi", "qed", "parallels", "dmg", "luks"}
)

_SCHEMES = frozenset(
    {"nbd", "nbd+unix", "nbds", "nbds+unix", "http", "https", "ftp", "ftps", "ssh"}
    | {"tar+file", "tar+http", "tar+https"}
)
# libnbd's URI query parameters for TLS, each naming a file or directory.
_TLS_PARAMS = frozenset({"tls-psk-file", "tls-certificates"})

# RFC 3986 characters; anything else (spaces, quotes, controls, non-ASCII) must be
# percent-encoded. Keeps shell and XML metacharacters out of every command line.
_URL_CHARS = re.compile(r"^[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+$")
_PATH_CHARS = re.compile(r"^/[A-Za-z0-9\-._~/+@%=:]*$")


@dataclass(frozen=True)
class ExternalURL:
    """A parsed external disk location."""

    url: str  # as given, normalized; also the qcow2 backing string
    scheme: str  # "file" for a local path

    @property
    def is_nbd(self) -> bool:
        return self.scheme in ("nbd", "nbd+unix", "nbds", "nbds+unix")

    @property
    def is_tls(self) -> bool:
        return self.scheme in ("nbds", "nbds+unix")

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    @property
    def local_files(self) -> list[str]:
        """The local files the engine would open for this URL: the image itself
        (or the tar holding it), the TLS key or certificates an ``nbds://`` URL
        names, or the Unix socket of an ``nbd+unix://`` one."""
        if self.is_local:
            return [self.url]
        if self.is_tar:
            inner, _entry = self.tar_entry
            return [inner] if inner.startswith("/") else []
        query = parse_qs(urlsplit(self.url).query)
        return [values[0] for key, values in query.items() if key in _TLS_PARAMS | {"socket"}]

    @property
    def is_tar(self) -> bool:
        return self.scheme.startswith("tar+")

    @property
    def tar_entry(self) -> tuple[str, str]:
        """(the tar file's own URL or path, the member's name) of a tar+ URL."""
        inner, _, entry = self.url.removeprefix("tar+").partition("#")
        if inner.startswith("file://"):
            inner = inner.removeprefix("file://")
        return inner, unquote(entry)


def inside(path: str, roots: Iterable[Path]) -> bool:
    """Is `path`, resolved (symlinks, ".."), one of `roots` or below one?"""
    if "\0" in path:
        return False
    real = Path(os.path.realpath(path))
    return any(real == root or root in real.parents for root in roots)


def tar_url(source: str, entry: str) -> str:
    """The URL of member `entry` of the tar at `source` (a path or an http(s) URL)."""
    prefix = "tar+file://" if source.startswith("/") else "tar+"
    return f"{prefix}{source}#{quote(entry, safe='')}"


def parse_url(text: str) -> ExternalURL:
    """Check an external disk URL; raise InvalidInput naming what is wrong."""
    if not text:
        raise InvalidInput("external disk URL is empty")
    if len(text) > 4096:
        raise InvalidInput("external disk URL is longer than 4096 characters")
    if text.startswith("/"):
        if not _PATH_CHARS.match(text) or "/../" in text + "/" or "//" in text:
            raise InvalidInput(f"bad local path {text!r}: use a plain absolute path")
        return ExternalURL(url=text, scheme="file")
    if not _URL_CHARS.match(text):
        raise InvalidInput(
            f"bad external disk URL {text!r}: characters such as spaces or quotes "
            "must be percent-encoded"
        )
    try:
        parts = urlsplit(text)
    except ValueError as e:  # e.g. "Invalid IPv6 URL"
        raise InvalidInput(f"bad external disk URL {text!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme == "file":
        return parse_url(parts.path)
    if scheme.startswith("tar+") and scheme in _SCHEMES:
        inner, _, entry = text[len("tar+") :].partition("#")
        if not entry or "#" in entry:
            raise InvalidInput(f"{text!r}: a tar+ URL names its member after '#'")
        if parse_url(inner).scheme != scheme.removeprefix("tar+") or (
            scheme == "tar+file" and not inner.startswith("file:///")
        ):
            raise InvalidInput(f"bad tar+ URL {text!r}")
        return ExternalURL(url=text, scheme=scheme)
    if scheme not in _SCHEMES:
        raise InvalidInput(
            f"unsupported URL scheme {parts.scheme!r} in {text!r}; use one of "
            f"{', '.join(sorted(_SCHEMES))} or an absolute path"
        )
    try:
        port = parts.port
    except ValueError as e:
        raise InvalidInput(f"bad port in {text!r}: {e}") from None
    query = parse_qs(parts.query, keep_blank_values=True)
    if scheme in ("nbds", "nbds+unix"):
        for key, values in query.items():
            if key not in _TLS_PARAMS | {"socket"} or len(values) != 1:
                raise InvalidInput(
                    f"{text!r}: unknown or repeated parameter {key!r} "
                    f"(known: {', '.join(sorted(_TLS_PARAMS))})"
                )
            if key in _TLS_PARAMS and not values[0].startswith("/"):
                raise InvalidInput(f"{text!r}: {key} must be an absolute path")
    if scheme in ("nbd+unix", "nbds+unix"):
        if parts.netloc:
            raise InvalidInput(
                f"{text!r}: {scheme} URLs have no host ({scheme}:///export?socket=PATH)"
            )
        sockets = query.get("socket", [])
        if len(sockets) != 1 or not sockets[0].startswith("/"):
            raise InvalidInput(f"{text!r}: {scheme} needs ?socket=/absolute/path")
        return ExternalURL(url=text, scheme=scheme)
    if not parts.hostname:
        raise InvalidInput(f"{text!r} has no host")
    if port == 0:
        raise InvalidInput(f"bad port 0 in {text!r}")
    if scheme in ("nbd", "nbds") and parts.fragment:
        raise InvalidInput(f"{text!r}: NBD URLs take no fragment")
    if scheme == "nbd":
        if parts.query or parts.fragment:
            raise InvalidInput(f"{text!r}: nbd URLs take no query or fragment")
    elif scheme in ("ssh", "ftp", "ftps", "http", "https") and parts.path in ("", "/"):
        raise InvalidInput(f"{text!r} names no file")
    return ExternalURL(url=text, scheme=scheme)


@dataclass(frozen=True)
class DiskSpec:
    """One ``--disk`` option: where the data is and how to use it."""

    url: str
    format: str | None = None
    storage: str | None = None
    check_readonly: bool = True


def _split_options(text: str) -> list[str]:
    # ",," is a literal comma (QEMU's convention); a single "," separates options.
    pieces = text.replace(",,", "\0").split(",")
    return [p.replace("\0", ",") for p in pieces]


@dataclass(frozen=True)
class BlankSpec:
    """A ``--disk size=N[,storage=SD]`` option: an empty disk of N bytes."""

    virtual_size: int
    storage: str | None = None


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)(?:([kmgt])(?:i?b)?)?$", re.IGNORECASE)
_UNITS = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """Bytes from ``10G``, ``512M``, ``1.5T``... (binary units, as qemu-img takes
    them); a bare number is GiB, as virt-install's ``--disk size=N``. Rounded up
    to a whole 512-byte sector."""
    m = _SIZE.match(text.strip())
    if not m:
        raise InvalidInput(
            f"bad size {text!r}: give GiB (size=10, as virt-install) or a number with "
            "K, M, G or T (size=512M)"
        )
    unit = _UNITS[m.group(2).lower()] if m.group(2) else 2**30
    exact = Fraction(m.group(1)) * unit
    return math.ceil(exact / 512) * 512


def is_blank_option(text: str) -> bool:
    return text.strip().startswith("size=")


def parse_blank_option(text: str) -> BlankSpec:
    """Parse ``size=N[,storage=SD]`` (virt-install's spelling of a new disk)."""
    values: dict[str, str] = {}
    for option in _split_options(text.strip()):
        key, sep, value = option.partition("=")
        if not sep or key not in ("size", "storage") or not value:
            raise InvalidInput(
                f"bad blank disk option {option!r} in {text!r}; known: size=N, storage=SD"
            )
        if key in values:
            raise InvalidInput(f"disk option {key!r} given twice in {text!r}")
        values[key] = value
    return BlankSpec(virtual_size=parse_size(values["size"]), storage=values.get("storage"))


def parse_disk_option(text: str) -> DiskSpec:
    """Parse ``URL[,format=F][,storage=SD][,check-readonly=on|off]``."""
    url, *options = _split_options(text.strip())
    values: dict[str, str] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in ("format", "storage", "check-readonly") or not value:
            raise InvalidInput(
                f"bad disk option {option!r} in {text!r}; known: format=F, storage=SD, "
                "check-readonly=on|off (write ,, for a comma inside the URL)"
            )
        if key in values:
            raise InvalidInput(f"disk option {key!r} given twice in {text!r}")
        values[key] = value
    check = values.get("check-readonly", "on")
    if check not in ("on", "off"):
        raise InvalidInput(f"check-readonly must be on or off, not {check!r}")
    spec = DiskSpec(
        url=url,
        format=values.get("format"),
        storage=values.get("storage"),
        check_readonly=check == "on",
    )
    validate_format(spec.format)
    parse_url(spec.url)
    return spec


def validate_format(fmt: str | None) -> None:
    if fmt is not None and fmt not in FORMATS:
        raise InvalidInput(f"unknown disk format {fmt!r}; known: {', '.join(sorted(FORMATS))}")
