"""Foreign images of the test guest, made with the real tools, and a web server
for them.

Every image is converted from the test guest image with qemu-img (VMDK
monolithic sparse and stream-optimized, VHDX, VDI, a two-layer qcow2 chain) and
cached beside it in ``THINAIR_CACHE/foreign``, named after the guest image, so a
test run converts each once. OVAs are tar files around an OVF and such a VMDK.
`http_server` serves a directory with nginx (range requests on, as for any
static file), as another host's web server would.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support import guest
from thinair.adapters import nginx, procfs, qemu_img, qemu_nbd

# kind -> (file suffix, the format qemu-img reports, qemu-img convert options)
KINDS: dict[str, tuple[str, str, list[str]]] = {
    "vmdk-sparse": (".vmdk", "vmdk", ["-O", "vmdk"]),
    "vmdk-stream": (".vmdk", "vmdk", ["-O", "vmdk", "-o", "subformat=streamOptimized"]),
    "vhdx": (".vhdx", "vhdx", ["-O", "vhdx"]),
    "vdi": (".vdi", "vdi", ["-O", "vdi"]),
    "raw": (".raw", "raw", []),
    "qcow2-chain": (".qcow2", "qcow2", []),  # the top of a chain; see _chain
}


def cache(guest_image: Path) -> Path:
    path = guest_image.parent / "foreign"
    path.mkdir(mode=0o755, exist_ok=True)
    return path


def _publish(tmp: Path, path: Path) -> Path:
    tmp.chmod(0o644)
    os.replace(tmp, path)  # whole or not at all, should two runs race
    return path


def image(guest_image: Path, kind: str) -> Path:
    """The guest image as `kind`, made once and cached."""
    suffix, _, options = KINDS[kind]
    path = cache(guest_image) / f"{guest_image.stem}-{kind}{suffix}"
    if path.exists():
        return path
    if kind == "raw":
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        os.link(guest_image, tmp)  # same bytes, same file system
        return _publish(tmp, path)
    if kind == "qcow2-chain":
        return _chain(guest_image, path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    subprocess.run(
        [qemu_img.binary(), "convert", "-f", "raw", *options, str(guest_image), str(tmp)],
        check=True,
        capture_output=True,
    )
    return _publish(tmp, path)


def _chain(guest_image: Path, top: Path) -> Path:
    """A backup-like chain: the base holds the guest image without its boot area
    (zeros), the top holds the boot area and names the base by a relative path.
    A guest that boots and finds its pattern read both layers."""
    base = top.with_name(f"{guest_image.stem}-chain-base.qcow2")
    if not base.exists():
        raw = base.with_name(f".{base.name}.{os.getpid()}.raw")
        subprocess.run(["cp", "--sparse=always", str(guest_image), str(raw)], check=True)
        with open(raw, "r+b") as f:
            f.write(bytes(guest.FAT_SIZE))
        tmp = base.with_name(f".{base.name}.{os.getpid()}")
        subprocess.run(
            [qemu_img.binary(), "convert", "-f", "raw", "-O", "qcow2", str(raw), str(tmp)],
            check=True,
            capture_output=True,
        )
        raw.unlink()
        _publish(tmp, base)
    tmp = top.with_name(f".{top.name}.{os.getpid()}")
    # -B: write only what differs from the base; the base is named as given,
    # relative to the top (qemu-img resolves it from the top's directory).
    subprocess.run(
        [qemu_img.binary(), "convert", "-f", "raw", "-O", "qcow2", "-B", base.name, "-F", "qcow2"]
        + [str(guest_image), str(tmp)],
        check=True,
        capture_output=True,
        cwd=top.parent,
    )
    return _publish(tmp, top)


def ovf(name: str, disks: list[tuple[str, int]], memory_mib: int = 256, cpus: int = 1) -> str:
    """An OVF 1.0 descriptor as VMware and VirtualBox write them (trimmed):
    References, DiskSection, VirtualSystem with CPU, memory and disk items."""
    refs = "".join(
        f'<File ovf:id="file{i}" ovf:href="{href}"/>' for i, (href, _) in enumerate(disks)
    )
    section = "".join(
        f'<Disk ovf:diskId="vmdisk{i}" ovf:fileRef="file{i}" ovf:capacity="{size}" '
        'ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>'
        for i, (_, size) in enumerate(disks)
    )
    drives = "".join(
        f"<Item><rasd:AddressOnParent>{i}</rasd:AddressOnParent>"
        f"<rasd:ElementName>disk{i}</rasd:ElementName>"
        f"<rasd:HostResource>ovf:/disk/vmdisk{i}</rasd:HostResource>"
        f"<rasd:InstanceID>{10 + i}</rasd:InstanceID>"
        "<rasd:ResourceType>17</rasd:ResourceType></Item>"
        for i in range(len(disks))
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"
 xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
 xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
 <References>{refs}</References>
 <DiskSection><Info>Virtual disks</Info>{section}</DiskSection>
 <VirtualSystem ovf:id="{name}">
  <Info>A virtual machine</Info>
  <Name>{name}</Name>
  <VirtualHardwareSection>
   <Info>Virtual hardware</Info>
   <Item><rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
    <rasd:ElementName>{cpus} virtual CPU(s)</rasd:ElementName>
    <rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType>
    <rasd:VirtualQuantity>{cpus}</rasd:VirtualQuantity></Item>
   <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
    <rasd:ElementName>{memory_mib}MB of memory</rasd:ElementName>
    <rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType>
    <rasd:VirtualQuantity>{memory_mib}</rasd:VirtualQuantity></Item>
   {drives}
  </VirtualHardwareSection>
 </VirtualSystem>
</Envelope>
"""


def make_ova(path: Path, descriptor: str, members: dict[str, Path | bytes]) -> Path:
    """An OVA: the OVF first (as the standard wants), then the other members."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        data = descriptor.encode()
        info = tarfile.TarInfo(path.stem + ".ovf")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for name, content in members.items():
            if isinstance(content, bytes):
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            else:
                tar.add(str(content), arcname=name)
    path.chmod(0o644)
    return path


def guest_ova(guest_image: Path, name: str = "appliance") -> Path:
    """An OVA of the test guest with one stream-optimized VMDK, cached."""
    path = cache(guest_image) / f"{guest_image.stem}-{name}.ova"
    if not path.exists():
        disk = image(guest_image, "vmdk-stream")
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.ova")
        make_ova(
            tmp, ovf(name, [(f"{name}-disk1.vmdk", guest.IMAGE_SIZE)]), {f"{name}-disk1.vmdk": disk}
        )
        _publish(tmp, path)
    return path


@contextmanager
def http_server(root: Path, workdir: Path) -> Iterator[str]:
    """nginx serving the files under `root` (GET and HEAD, range requests);
    yields the base URL, ending in '/'."""
    conf_dir = workdir / f"nginx-{os.urandom(4).hex()}"
    conf_dir.mkdir(mode=0o755)
    port = qemu_nbd.free_port()
    user = "user nobody nogroup;\n" if os.geteuid() == 0 else ""
    (conf_dir / "nginx.conf").write_text(
        f"""{user}daemon on;
worker_processes 1;
pid "{conf_dir}/nginx.pid";
error_log "{conf_dir}/nginx-error.log" warn;
events {{ worker_connections 256; }}
http {{
    access_log "{conf_dir}/access.log";
    client_body_temp_path "{conf_dir}/body";
    default_type application/octet-stream;
    types {{ }}
    server {{
        listen 127.0.0.1:{port};
        root "{root}";
        location / {{ limit_except GET {{ deny all; }} }}
    }}
}}
"""
    )
    pid = nginx.start(conf_dir)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        procfs.terminate(pid, nginx.PROGRAMS, str(conf_dir) + "/")
