"""A second libvirt host on this machine, for cross-host tests.

A network namespace joined to the root one by a veth pair (its own /24), and
in it a system libvirtd (and its virtlogd) with state of its own: a private
mount namespace binds directories of the host's over /run/libvirt,
/var/lib/libvirt, /etc/libvirt, /var/log/libvirt and /var/cache/libvirt.
The rest of the filesystem is the same, as an NFS mount would be. libvirtd
listens for qemu+tcp:// on the namespace's address only (no auth: a test
network). `stop()` destroys its domains and stops its processes (by pid), and
the namespaces go with them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

BINDS = {
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "etc": "/etc/libvirt",
    "log": "/var/log/libvirt",
    "cache": "/var/cache/libvirt",
}
QEMU_USER, QEMU_GROUP = "libvirt-qemu", "kvm"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def free_subnet() -> str:
    """The first 10.231-239.N.0/24 no interface of the root namespace uses."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for second in range(231, 240):
        for third in range(0, 256):
            prefix = f"10.{second}.{third}."
            if f" {prefix}" not in used:
                return prefix
    raise RuntimeError("no free 10.231-239.N.0/24 subnet")


@dataclass
class NetnsHost:
    root: Path
    prefix: str = field(default_factory=free_subnet)  # "10.231.0."
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    pids: list[int] = field(default_factory=list)

    @property
    def ns(self) -> str:
        return f"so-host-{self.tag}"

    @property
    def here(self) -> str:
        """The root namespace's address on the link: what the other host reaches."""
        return self.prefix + "1"

    @property
    def address(self) -> str:
        return self.prefix + "2"

    @property
    def uri(self) -> str:
        return f"qemu+tcp://{self.address}/system"

    def _config(self) -> None:
        for name in BINDS:
            (self.root / name).mkdir(parents=True, exist_ok=True)
        for conf in Path("/etc/libvirt").glob("*.conf"):  # no domains, no networks
            shutil.copy(conf, self.root / "etc" / conf.name)
        (self.root / "etc" / "libvirtd.conf").write_text(
            f'listen_tls = 0\nlisten_tcp = 1\nlisten_addr = "{self.address}"\n'
            'auth_tcp = "none"\nunix_sock_group = "root"\n'
        )
        qemu = self.root / "lib" / "qemu"
        qemu.mkdir(exist_ok=True)
        shutil.chown(qemu, QEMU_USER, QEMU_GROUP)
        os.chmod(self.root, 0o755)

    def start(self) -> None:
        self.root.mkdir(parents=True, mode=0o755)
        self._config()
        veth = f"so{self.tag}"
        _ip("netns", "add", self.ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
        _ip("addr", "add", f"{self.here}/24", "dev", veth)
        _ip("link", "set", veth, "up")
        _ip("-n", self.ns, "addr", "add", f"{self.address}/24", "dev", "eth0")
        _ip("-n", self.ns, "link", "set", "eth0", "up")
        _ip("-n", self.ns, "link", "set", "lo", "up")
        mounts = "; ".join(f"mount --bind {self.root / k} {v}" for k, v in BINDS.items())
        logd_pid, libvirtd_pid = self.root / "virtlogd.pid", self.root / "libvirtd.pid"
        script = (
            f"set -e; {mounts}; "
            f"virtlogd -d -p {logd_pid}; "
            f"libvirtd -d -l -p {libvirtd_pid} -f /etc/libvirt/libvirtd.conf"
        )
        subprocess.run(
            ["ip", "netns", "exec", self.ns, "unshare", "-m", "--propagation", "private"]
            + ["sh", "-c", script],
            check=True,
            capture_output=True,
        )
        for pid_file in (logd_pid, libvirtd_pid):
            deadline = time.monotonic() + 20
            while not pid_file.exists() or not pid_file.read_text().strip():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{pid_file.name} did not appear")
                time.sleep(0.05)
            self.pids.append(int(pid_file.read_text().strip()))
        deadline = time.monotonic() + 30
        while True:
            try:
                libvirt.open(self.uri).close()
                return
            except libvirt.libvirtError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        try:
            conn = libvirt.open(self.uri)
            for dom in conn.listAllDomains():
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
            conn.close()
        except libvirt.libvirtError:
            pass
        for pid in reversed(self.pids):  # libvirtd first, then virtlogd
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
        self.pids.clear()
        subprocess.run(["ip", "netns", "delete", self.ns], capture_output=True)
        subprocess.run(["ip", "link", "delete", f"so{self.tag}"], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
