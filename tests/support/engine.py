"""A `thinair engine` process for tests and benchmarks: its own THINAIR_HOME,
port and libvirt URI, started and stopped like a user would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from thinair.adapters import qemu_nbd
from thinair.client import Client, ThinairAPIError
from thinair.config import Settings

VENV_BIN = Path(sys.executable).parent
IMAGE_ROOTS = ("/var/tmp/thinair-tests", "/var/tmp/thinair-bench", "/var/cache/thinair")


@dataclass
class Engine:
    """A `thinair engine` process with its own THINAIR_HOME and port."""

    home: Path
    libvirt_uri: str
    port: int = field(default_factory=qemu_nbd.free_port)
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    start_timeout: float = 30.0  # seconds until it answers

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("THINAIR_")}
        env.update(
            {
                "THINAIR_HOME": str(self.home),
                "THINAIR_LISTEN": f"127.0.0.1:{self.port}",
                "THINAIR_URL": f"http://127.0.0.1:{self.port}",
                "THINAIR_LIBVIRT_URI": self.libvirt_uri,
                # Where tests and benchmarks keep the images they run and expose.
                "THINAIR_IMAGE_ROOTS": ":".join(IMAGE_ROOTS),
                **self.extra_env,
            }
        )
        return env

    @property
    def settings(self) -> Settings:
        return Settings.load(self.env)

    def start(self) -> None:
        log = open(self.home.parent / f"engine-{self.port}.log", "ab")  # noqa: SIM115
        self.home.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "thinair"), "engine"],
            env=self.env,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited with {self.proc.returncode}: {self.log()}")
            try:
                self.client().health()
                return
            except ThinairAPIError:
                time.sleep(0.1)
        raise RuntimeError(f"engine did not answer in {self.start_timeout:g} s: {self.log()}")

    def log(self) -> str:
        path = self.home.parent / f"engine-{self.port}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client(self) -> Client:
        return Client(settings=self.settings, timeout=300)

    def cli(
        self, *args: str, check: bool = False, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(VENV_BIN / "thinair"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"thinair {' '.join(args)} failed: {done.stderr}")
        return done
