"""GET /metrics scraped by a real Prometheus (Debian's package) during a live
import: its query API returns thinair's series, with the values of the job's own
progress, through a read-only token in Prometheus' `authorization` block."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Engine
from tests.support.prometheus import Prometheus
from thinair.adapters import qemu_nbd

pytestmark = pytest.mark.libvirt

MiB = 2**20


def _value(prom: Prometheus, expr: str) -> float | None:
    result = prom.query(expr)
    return float(result[0]["value"][1]) if result else None


def _until(prom: Prometheus, expr: str, ok: Callable[[float], bool], timeout: float = 30) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = _value(prom, expr)
        if value is not None and ok(value):
            return value
        time.sleep(0.2)
    raise AssertionError(f"{expr} never held; last {prom.query(expr)}\n{prom.log()}")


def test_prometheus_scrapes_an_import(
    engine: Engine,
    domains: tuple[Path, Path],
    workdir: Path,
    nbd_export: Callable[..., qemu_nbd.Server],
) -> None:
    image = workdir / "i17-src.raw"
    with open(image, "wb") as f:
        f.write(os.urandom(12 * MiB))
        f.truncate(32 * MiB)
    export = nbd_export(image)
    c = engine.client()
    scrape = c.tokens.create("prometheus", read_only=True)
    prom = Prometheus(workdir / "prometheus", f"127.0.0.1:{engine.port}", scrape.token)
    prom.start()
    try:
        c.vms.create("i17-prom", disks=[f"{export.url},storage=tmp"], memory_mib=128)
        c.vms.start("i17-prom")
        _until(prom, 'up{job="thinair"}', lambda v: v == 1)
        _until(prom, 'thinair_vms{phase="ready",state="running"}', lambda v: v == 1)
        _until(prom, 'thinair_external_source_up{vm="i17-prom",disk="vda"}', lambda v: v == 1)

        job = c.vms.import_("i17-prom", to="final", strategy="mirror", bandwidth_mib=2)
        # Every (done, total, rate) the job reported while we looked, and the same
        # three as Prometheus has them from one scrape.
        seen: set[tuple[float, float, float]] = set()
        scraped: tuple[float, float, float] | None = None
        series = f'{{__name__=~"thinair_import_.*",job_id="{job.id}",vm="i17-prom"}}'
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            p = c.jobs.get(job.id).progress
            if "done" in p:
                seen.add((float(p["done"]), float(p["total"]), float(p["rate"])))
            values = {r["metric"]["__name__"]: float(r["value"][1]) for r in prom.query(series)}
            if len(values) == 3:
                scraped = (
                    values["thinair_import_copied_bytes"],
                    values["thinair_import_total_bytes"],
                    values["thinair_import_rate_bytes_per_second"],
                )
                if scraped in seen and 0 < scraped[0] < scraped[1]:
                    break
            time.sleep(0.1)
        final = c.jobs.get(job.id)
        assert scraped in seen, (scraped, sorted(seen), final.state, prom.targets())
        copied, total, rate = scraped
        assert total == 32 * MiB and 0 < copied < total and rate > 0
        assert _value(prom, 'thinair_jobs{kind="import",state="running"}') == 1
        print(
            f"\nprometheus during the import: copied {copied:.0f} of {total:.0f} bytes, "
            f"rate {rate:.0f} B/s (job {job.id})"
        )

        assert c.jobs.wait(job.id, timeout=120).state == "succeeded"
        _until(
            prom,
            'thinair_flow_duration_seconds_count{kind="import",state="succeeded"}',
            lambda v: v == 1,
        )
        _until(
            prom, 'count(thinair_external_source_up{vm="i17-prom"}) or vector(0)', lambda v: v == 0
        )
        assert prom.query(f'thinair_import_copied_bytes{{job_id="{job.id}"}}') == []
        assert _value(prom, "thinair_vm_time_to_running_seconds_count") == 1
        assert _value(prom, "thinair_event_loop_lag_observed_seconds_count") is not None
        c.vms.stop("i17-prom", force=True)
        c.vms.remove("i17-prom")
    finally:
        prom.stop()
