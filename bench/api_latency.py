"""API latency: GET /api/v1/vms with 1,000 and 10,000 VMs in the database.

An engine is started once on an empty database (its migrations make the schema,
two storage domains are added) and stopped; the VMs, one disk each, are then
written straight into its SQLite database (thinair.db.models), as `ready` VMs
on an external http:// disk (an NBD one would have the engine start an nbdkit
bridge per disk, 1,000 processes: not what this measures, and not for a shared
machine). The engine is started again: its reconciler defines a domain for
each, which is why this benchmark runs the engine on libvirt's test driver
(test:///default, in the engine's process) rather than on the machine's
libvirtd. Then, with httpx and the engine's token, 200 GET /api/v1/health (the
floor: routing, auth, JSON), 200 GET /api/v1/vms (every VM in one answer) and
200 GET /api/v1/vms?limit=PAGE&after=NAME (a page, as the SDK and `thinair vm
list` read them: PAGE is thinair.client.PAGE_SIZE, each request a page at
another place in the list), one at a time after 10 unmeasured requests each.
The same again with 10,000 VMs (9,000 more written, the engine restarted).
Figures: p50 and p99 against /health's; the engine's start against its start on
the empty database. Targets (issue 16): p99 <= 20 ms at 1,000 VMs, <= 60 ms
for a page at 10,000.

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

from thinair.client import PAGE_SIZE  # noqa: E402
from thinair.db.models import Disk, StorageDomain, Vm, new_id  # noqa: E402
from thinair.db.session import Database  # noqa: E402

VMS = (1000, 10000)
WARMUP = 10
# p99 targets, ms: every VM at 1,000; a page at 1,000 and at 10,000.
TARGETS = {("all", 1000): 20.0, ("page", 1000): 20.0, ("page", 10000): 60.0}


def insert_vms(db_url: str, count: int, first: int = 0) -> None:
    db = Database(db_url)
    try:
        with db.session() as s:
            sd = s.scalars(select(StorageDomain).where(StorageDomain.name == "tmp")).one()
            for i in range(first, first + count):
                vm = Vm(
                    id=new_id(),
                    name=f"api-{i:05d}",
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
                        volume_path=f"{sd.path}/{i:05d}.qcow2",
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


def latencies(http: httpx.Client, paths: list[str], count: int) -> list[float]:
    """Seconds per request, `count` requests one after the other, going round
    `paths`."""
    for n in range(WARMUP):
        http.get(paths[n % len(paths)]).raise_for_status()
    seconds = []
    for n in range(count):
        began = time.perf_counter()
        r = http.get(paths[n % len(paths)])
        seconds.append(time.perf_counter() - began)
        r.raise_for_status()
    return seconds


def page_paths(count: int) -> list[str]:
    """A page of PAGE_SIZE at ten places spread over the list (the last ones short)."""
    names = [f"api-{i:05d}" for i in range(0, count, max(1, count // 10))]
    return [f"/api/v1/vms?limit={PAGE_SIZE}"] + [
        f"/api/v1/vms?limit={PAGE_SIZE}&after={name}" for name in names[1:]
    ]


def _row(figure: str, values: list[float], ref: list[float], p: float, target: float | None) -> Row:
    value = (median(values) if p == 50 else percentile(values, p)) * 1000
    reference = (median(ref) if p == 50 else percentile(ref, p)) * 1000
    return Row(
        figure,
        value,
        "ms",
        reference=reference,
        target=f"<= {target:g} ms" if target else "",
        met=value <= target if target else None,
    )


def run(quick: bool) -> list[Row]:
    count = 100 if quick else 200
    rows: list[Row] = []
    with Lab("api", libvirt_uri="test:///default") as lab:
        engine = lab.engine
        engine.start_timeout = 600  # its reconciler defines 10,000 domains
        engine.stop()
        with timer() as empty_start:
            engine.start()
        engine.stop()
        written = 0
        for total in VMS:
            engine.stop()
            insert_vms(engine.settings.db_url, total - written, first=written)
            written = total
            with timer() as full_start:
                engine.start()
            settings = engine.settings
            token = settings.token_file.read_text().strip()
            with httpx.Client(
                base_url=settings.url, headers={"Authorization": f"Bearer {token}"}, timeout=60
            ) as http:
                listed = http.get("/api/v1/vms").json()
                if len(listed) != total:
                    raise RuntimeError(f"GET /vms listed {len(listed)} VMs, not {total}")
                health = latencies(http, ["/api/v1/health"], count)
                every = latencies(http, ["/api/v1/vms"], count // 4 if total > 1000 else count)
                pages = latencies(http, page_paths(total), count)
            log(
                f"{total} VMs: /health p50 {median(health) * 1000:.1f} ms; /vms p50 "
                f"{median(every) * 1000:.1f} ms p99 {percentile(every, 99) * 1000:.1f} ms; "
                f"a page of {PAGE_SIZE} p50 {median(pages) * 1000:.1f} ms "
                f"p99 {percentile(pages, 99) * 1000:.1f} ms; engine start {full_start():.2f} s, "
                f"{empty_start():.2f} s empty"
            )
            n = f"{total:,}"
            for p in (50, 99):
                rows.append(
                    _row(
                        f"GET /vms, {n} VMs: p{p} (x GET /health p{p})",
                        every,
                        health,
                        p,
                        TARGETS.get(("all", total)) if p == 99 else None,
                    )
                )
            for p in (50, 99):
                rows.append(
                    _row(
                        f"GET /vms?limit={PAGE_SIZE}, {n} VMs: p{p} (x GET /health p{p})",
                        pages,
                        health,
                        p,
                        TARGETS.get(("page", total)) if p == 99 else None,
                    )
                )
            rows.append(
                Row(
                    f"engine start, {n} VMs (x empty database)",
                    full_start(),
                    "s",
                    reference=empty_start(),
                )
            )
    return rows


if __name__ == "__main__":
    bench_main("api_latency", run, __doc__)
