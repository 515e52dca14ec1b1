"""Settings: the environment first, then an optional TOML file, then defaults.

One place for every knob, so the engine, the CLI and the tests agree.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

DEFAULT_PORT = 8470


def _default_home() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/thinair")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "thinair"


@dataclass(frozen=True)
class Settings:
    home: Path = field(default_factory=_default_home)
    url: str = f"http://127.0.0.1:{DEFAULT_PORT}"
    token: str | None = None
    libvirt_uri: str = "qemu:///system"
    db: str | None = None  # SQLAlchemy URL; None means SQLite in home
    listen: str = f"127.0.0.1:{DEFAULT_PORT}"
    # "auto" picks kvm where a guest can run under it, qemu (TCG) elsewhere.
    domain_type: str = "auto"
    # Seconds to wait for an external disk's server before calling it unreachable.
    probe_timeout: float = 20.0
    # A storage domain with less free space than this refuses new volumes.
    min_free_mib: int = 256
    # Seconds an NBD source may be gone (restarting) before its bridge fails a
    # read; the read then pauses the VM (never an error in the guest).
    reconnect_window: float = 30.0
    # Seconds between two checks of the source of a VM paused on an I/O error;
    # the VM resumes once its source answers.
    resume_check_interval: float = 5.0
    # Seconds a graceful stop waits for the guest before giving up.
    stop_timeout: float = 60.0
    # HTTPS for the engine: its certificate and key (PEM); clients verify the
    # engine with ca_cert (or the system's CAs when it is not set).
    tls_cert: str | None = None
    tls_key: str | None = None
    ca_cert: str | None = None
    # Directories (":"-separated) whose files may be run from or exposed by path,
    # besides the storage domains. Anyone with a read-write token can ask the
    # engine (root) to read a local path; this keeps /etc and /root out of reach.
    image_roots: str = "/srv:/var/lib/libvirt/images"
    # An NBD source's bridge keeps what it read in a local cache (nbdkit's cow
    # filter), fetching bridge_cache_block_kib at a time (a power of 2, >= 4),
    # until it fetched bridge_cache_max_mib (then it keeps no more; 0: no limit);
    # with bridge_readahead, the engine streams into it ahead of the guest's
    # sequential reads, at most bridge_readahead_max_mib at a time (see
    # thinair.engine.readahead).
    bridge_cache: bool = True
    bridge_cache_block_kib: int = 1024
    bridge_cache_max_mib: int = 2048
    bridge_readahead: bool = True
    bridge_readahead_max_mib: int = 128
    # ... and, while the guest leaves the link idle, fetches the rest of a far
    # source's data into it, up to 3/4 of bridge_cache_max_mib (see
    # thinair.engine.readahead).
    bridge_prefetch: bool = True
    # A cached bridge records what its source's first boot read (its first
    # working_set_seconds) and the next bridge to that source prefetches it
    # (off: with the cache, the test guest's boot had too few misses left for
    # it to pay, and the log records every miss, an import's reads included).
    working_set: bool = False
    working_set_seconds: float = 60.0
    # QEMU keeps in the temporary disk what the guest read from its source
    # (libvirt's copy_on_read), so nothing the guest reads crosses the link twice.
    copy_on_read: bool = False

    def __post_init__(self) -> None:
        # What a guest that stops reading leaves fetched for nothing, at most.
        if not 1 <= self.bridge_readahead_max_mib <= 1024:
            raise ValueError(
                f"setting bridge_readahead_max_mib: {self.bridge_readahead_max_mib} "
                "is not between 1 and 1024"
            )

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{self.home / 'thinair.db'}"

    @property
    def token_file(self) -> Path:
        return self.home / "token"

    @property
    def console_dir(self) -> Path:
        return self.home / "console"

    @property
    def image_root_paths(self) -> list[Path]:
        return [Path(p) for p in self.image_roots.split(":") if p] + [self.home / "images"]

    @property
    def listen_host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def listen_port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    @classmethod
    def load(cls, env: dict[str, str] | None = None) -> Settings:
        """Settings from THINAIR_* variables, then THINAIR_CONFIG (TOML), then defaults."""
        env = dict(os.environ if env is None else env)
        values: dict[str, object] = {}
        config_path = env.get("THINAIR_CONFIG")
        if config_path:
            with open(config_path, "rb") as f:
                values.update(tomllib.load(f))
        for f_ in fields(cls):
            key = "THINAIR_" + f_.name.upper()
            if key in env and env[key] != "":
                values[f_.name] = env[key]
        known = {f_.name: f_ for f_ in fields(cls)}
        unknown = set(values) - set(known)
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
        converted: dict[str, object] = {}
        for name, raw in values.items():
            kind = known[name].type
            if name == "home":
                converted[name] = Path(str(raw)).expanduser()
            elif kind in ("float",):
                converted[name] = float(raw)  # type: ignore[arg-type]
            elif kind in ("int",):
                converted[name] = int(raw)  # type: ignore[call-overload]
            elif kind in ("bool",):
                converted[name] = _boolean(name, raw)
            else:
                converted[name] = str(raw)
        if "url" not in converted and "listen" in converted:
            converted["url"] = f"http://{converted['listen']}"
        return cls(**converted)  # type: ignore[arg-type]


def _boolean(name: str, raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"setting {name}: {raw!r} is not on or off")
