"""API latency: GET /api/v1/vms with 1,000 VMs in the database, p50 and p99.

An engine is started once on an empty database (its migrations make the schema,
two storage domains are added) and stopped; 1,000 VMs with one disk each are
then written straight into its SQLite database (thinair.db.models), as
`ready` VMs on an external http:// disk (an NBD one would have the engine start
an nbdkit bridge per disk, 1,000 processes: not what this measures, and not
for a shared machine). The engine is started again: its
reconciler defines a domain for each, which is why this benchmark runs the
engine on libvirt's test driver (test:///default, in the engine's process)
rather than on the machine's libvirtd. Then, with httpx and the engine's token,
200 GET /api/v1/health (the floor: routing, auth, JSON) and 200 GET
/api/v1/vms, one at a time after 10 unmeasured requests each.
Figures: /vms p50 and p99 against /health's; the engine's start with 1,000
VMs against its start on the empty database.

    .venv/bin/python bench/api_latency.py [--quick]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from common import Lab, Row, bench_main, log, median, percentile, timer  # noqa: E402
from sqlalchemy import select  # noqa: E402

from thinair.db.models import Disk, StorageDomain, Vm, new_id  # noqa: E402
from thinair.db.session import Database  # noqa: E402

VMS = 1000
WARMUP = 10


def insert_vms(db_url: str, count: int) -> None:
    db = Database(db_url)
    try:
        with db.session() as s:
            sd = s.scalars(select(StorageDomain).where(StorageDomain.name == "tmp")).one()
            for i in range(count):
                vm = Vm(
                    id=new_id(),
                    name=f"api-{i:04d}",
                    memory_mib=512,
                    cpus=1,
                    phase="ready",
                    domain_type="qemu",
                    console_log=f"/nonexistent/console/{i}.log",
                )
                vm.disks.append(
                    Disk(
                        id=new_id(),
                        position=0,
                        target="vda",
                        storage_domain_id=sd.id,
                        volume_path=f"{sd.path}/{i:04d}.qcow2",
                        volume_format="qcow2",
                        virtual_size=10 * 2**30,
                        external_url=f"http://192.0.2.1/disk{i}.raw",
                        external_format="raw",
                        external_read_only=True,
                    )
                )
                s.add(vm)
    finally:
        db.dispose()


def latencies(http: httpx.Client, path: str, count: int) -> list[float]:
    """Seconds per request, `count` requests one after the other."""
    for _ in range(WARMUP):
        http.get(path).raise_for_status()
    seconds = []
    for _ in range(count):
        began = time.perf_counter()
        r = http.get(path)
        seconds.append(time.perf_counter() - began)
        r.raise_for_status()
    return seconds


def run(quick: bool) -> list[Row]:
    count = 200
    with Lab("api", libvirt_uri="test:///default") as lab:
        engine = lab.engine
        engine.stop()
        with timer() as empty_start:
            engine.start()
        engine.stop()
        insert_vms(engine.settings.db_url, VMS)
        with timer() as full_start:
            engine.start()
        settings = engine.settings
        token = settings.token_file.read_text().strip()
        with httpx.Client(
            base_url=settings.url, headers={"Authorization": f"Bearer {token}"}, timeout=60
        ) as http:
            listed = http.get("/api/v1/vms").json()
            if len(listed) != VMS:
                raise RuntimeError(f"GET /vms listed {len(listed)} VMs, not {VMS}")
            health = latencies(http, "/api/v1/health", count)
            vms = latencies(http, "/api/v1/vms", count)
        log(
            f"/health p50 {median(health) * 1000:.1f} ms, /vms p50 {median(vms) * 1000:.1f} ms "
            f"p99 {percentile(vms, 99) * 1000:.1f} ms; engine start {full_start():.2f} s "
            f"with {VMS} VMs, {empty_start():.2f} s empty"
        )
    return [
        Row(
            f"GET /vms, {VMS} VMs: p50 (x GET /health p50)",
            median(vms) * 1000,
            "ms",
            reference=median(health) * 1000,
        ),
        Row(
            f"GET /vms, {VMS} VMs: p99 (x GET /health p99)",
            percentile(vms, 99) * 1000,
            "ms",
            reference=percentile(health, 99) * 1000,
        ),
        Row(
            f"engine start, {VMS} VMs (x empty database)",
            full_start(),
            "s",
            reference=empty_start(),
        ),
    ]


if __name__ == "__main__":
    bench_main("api_latency", run, __doc__)
