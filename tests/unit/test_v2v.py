"""The virt-v2v adapter's own logic: the source XML it writes and the error it
takes from virt-v2v's log (the text below is what virt-v2v-in-place 2.2 printed
here for a blank disk)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from thinair.adapters import v2v

FAILED_LOG = """\
$ virt-v2v-in-place -v -x -i libvirtxml /tmp/x/source.xml
[   0.0] Setting up the source: -i libvirtxml /tmp/x/source.xml
[   1.1] Opening the source
[    0.000000] Linux version 6.1.0-56-amd64
[  48.5] Inspecting the source
virt-v2v-in-place: error: inspection could not detect the source guest (or physical machine).

Assuming that you are running virt-v2v/virt-p2v on a source which is supported (and not, for \
example, a blank disk), then this should not happen.

No root device found in this operating system image.

If reporting bugs, run virt-v2v-in-place with debugging enabled and include the complete output:

  virt-v2v-in-place -v -x [...]
libguestfs: closing guestfs handle 0x55 (state 2)
"""


def test_source_xml_names_foreign_sata_disks() -> None:
    xml = v2v.source_xml(
        "web1", 512, 2, [v2v.Disk("/sd/a.qcow2", "qcow2"), v2v.Disk("/sd/b.qcow2", "qcow2")]
    )
    dom = ET.fromstring(xml)
    assert dom.findtext("name") == "web1" and dom.findtext("vcpu") == "2"
    disks = dom.findall("devices/disk")
    assert [d.find("source").get("file") for d in disks] == ["/sd/a.qcow2", "/sd/b.qcow2"]  # type: ignore[union-attr]
    assert [(d.find("target").get("dev"), d.find("target").get("bus")) for d in disks] == [  # type: ignore[union-attr]
        ("sda", "sata"),
        ("sdb", "sata"),
    ]
    assert {d.find("driver").get("type") for d in disks} == {"qcow2"}  # type: ignore[union-attr]


def test_source_xml_escapes_names() -> None:
    dom = ET.fromstring(v2v.source_xml("a<b&c", 16, 1, [v2v.Disk("/x/'\"<.qcow2", "qcow2")]))
    assert dom.findtext("name") == "a<b&c"


def test_summary_is_virt_v2v_error(tmp_path: Path) -> None:
    log = tmp_path / "vm.log"
    log.write_text(FAILED_LOG)
    said = v2v.summary(log)
    assert said.startswith("virt-v2v-in-place: error: inspection could not detect")
    assert "No root device found" in said
    assert "If reporting bugs" not in said and "libguestfs: closing" not in said


def test_summary_without_an_error_line_is_the_tail(tmp_path: Path) -> None:
    log = tmp_path / "vm.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "Killed\n")
    said = v2v.summary(log).splitlines()
    assert said[-1] == "Killed" and len(said) == v2v.TAIL_LINES and said[0] == "line 89"


def test_progress_lines_only() -> None:
    assert v2v.STEP.match("[  36.3] Inspecting the source")
    assert not v2v.STEP.match("[    0.000000] Linux version 6.1.0")
