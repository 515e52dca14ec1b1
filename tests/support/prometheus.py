"""A real Prometheus (Debian's `prometheus`) for tests: its own config, data
directory and loopback port, scraping one engine with a bearer token from a file
(Prometheus' `authorization` block), queried through its HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from thinair.adapters import qemu_nbd

CONFIG = """\
global:
  scrape_interval: {interval}
  scrape_timeout: {interval}
scrape_configs:
  - job_name: thinair
    static_configs:
      - targets: ["{target}"]
    authorization:
      type: Bearer
      credentials_file: {token_file}
"""


@dataclass
class Prometheus:
    workdir: Path
    target: str  # HOST:PORT of the engine
    token: str
    interval: str = "1s"
    port: int = field(default_factory=qemu_nbd.free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed (Debian package prometheus)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        token_file = self.workdir / "thinair.token"
        token_file.write_text(self.token + "\n")
        token_file.chmod(0o600)
        config = self.workdir / "prometheus.yml"
        config.write_text(
            CONFIG.format(interval=self.interval, target=self.target, token_file=token_file)
        )
        log = open(self.workdir / "prometheus.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready in 30 s: {self.log()}")

    def log(self) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query: the API's result list (metric labels and [time, value])."""
        reply = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = reply.json()
        if body.get("status") != "success":
            raise AssertionError(f"query {expr!r} failed: {json.dumps(body)}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        reply = httpx.get(f"{self.url}/api/v1/targets", timeout=10)
        active: list[dict[str, Any]] = reply.json()["data"]["activeTargets"]
        return active

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
