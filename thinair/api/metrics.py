"""GET /metrics: the engine in Prometheus' text format (prometheus-client).

Every scrape reads the engine's own records (VMs, jobs, exports) through the
engine's functions, so the figures are the ones the API shows, survive an engine
restart and need no hook in the flows: histograms of flow durations are built
from the jobs' created/finished times, time to running from each VM's last start.
Bytes copied and the copy rate of a running import are its job's progress. The
external sources (the servers behind VMs' external disks) are asked whether they
answer, in parallel, with a short deadline, at most every SOURCE_TTL seconds. The
event loop's lag is measured by a task that sleeps and notes how late it wakes.

It needs a token like any route: a read-only one (`thinair token create
prometheus --read-only`) is enough, set in Prometheus' `authorization` block.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit, urlunsplit

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool

from thinair import models
from thinair.adapters import nbd_client, qemu_img
from thinair.adapters.errors import CommandFailed
from thinair.api.deps import ERRORS, Ctx, authenticated
from thinair.engine import exports, vms
from thinair.engine.context import EngineContext
from thinair.external import parse_url
from thinair.version import __version__

log = logging.getLogger(__name__)

router = APIRouter(dependencies=[Depends(authenticated)], responses=ERRORS, tags=["metrics"])

# Seconds: a VM starts in about one; a flow (import, convert) takes seconds to hours.
START_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 30, 60)
FLOW_BUCKETS = (1, 5, 10, 30, 60, 300, 600, 1800, 3600, 4 * 3600, 12 * 3600)
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5)
LAG_INTERVAL = 0.5
SOURCE_TIMEOUT = 2.0
SOURCE_TTL = 15.0


class LoopLag:
    """How late the engine's event loop runs a task that asked to wake up."""

    def __init__(self) -> None:
        self.last = 0.0
        self.counts = [0] * (len(LAG_BUCKETS) + 1)
        self.total = 0.0
        self._task: asyncio.Task[None] | None = None

    def ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(LAG_INTERVAL)
            self.observe(max(loop.time() - before - LAG_INTERVAL, 0.0))

    def observe(self, lag: float) -> None:
        self.last = lag
        self.total += lag
        index = next((i for i, b in enumerate(LAG_BUCKETS) if lag <= b), len(LAG_BUCKETS))
        self.counts[index] += 1


class SourceProbe:
    """Does each external disk's server answer? Asked in the background at most
    every SOURCE_TTL seconds, so that a scrape never waits for a slow server: a
    scrape gets the last answers (a source not asked yet has no series)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._at = -SOURCE_TTL
        self._asking = False
        self._answers: dict[str, bool] = {}

    def answers(self, urls: set[str]) -> dict[str, bool]:
        with self._lock:
            stale = time.monotonic() - self._at > SOURCE_TTL or not urls <= set(self._answers)
            if stale and urls and not self._asking:
                self._asking = True
                threading.Thread(target=self._ask, args=(urls,), daemon=True).start()
            return {url: up for url, up in self._answers.items() if url in urls}

    def _ask(self, urls: set[str]) -> None:
        answers: dict[str, bool] | None = None
        try:
            with ThreadPoolExecutor(max_workers=8) as pool:
                answers = dict(zip(urls, pool.map(_answers, urls), strict=True))
        except Exception:  # keep the last answers; the next scrape asks again
            log.exception("asking the external sources failed")
        with self._lock:
            if answers is not None:
                self._answers = answers
            self._at = time.monotonic()
            self._asking = False


def _answers(url: str) -> bool:
    ext = parse_url(url)
    try:
        if ext.is_nbd:
            nbd_client.probe(ext.url, SOURCE_TIMEOUT)
        else:
            qemu_img.info(ext.url, None, SOURCE_TIMEOUT)
        return True
    except (nbd_client.NBDProbeError, CommandFailed, OSError):
        return False


def _shown(url: str) -> str:
    """A URL for a label: without its query (key file paths) or user."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _add_histogram(
    family: HistogramMetricFamily,
    labels: list[str],
    values: list[float],
    buckets: tuple[float, ...],
) -> None:
    cumulative = [(str(float(b)), float(sum(1 for v in values if v <= b))) for b in buckets]
    cumulative.append(("+Inf", float(len(values))))
    family.add_metric(labels, cumulative, sum_value=sum(values))


class EngineCollector(Collector):
    def __init__(
        self,
        vm_list: list[models.Vm],
        jobs: list[models.Job],
        export_list: list[models.Export],
        sources: dict[tuple[str, str], tuple[str, bool]],
        lag: LoopLag,
    ) -> None:
        self.vms, self.jobs, self.exports = vm_list, jobs, export_list
        self.sources, self.lag = sources, lag

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("thinair_info", "The engine's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield from self._vms()
        yield from self._jobs()
        yield from self._exports()
        yield from self._sources()
        yield from self._lag()

    def _vms(self) -> Iterable[Metric]:
        by = GaugeMetricFamily("thinair_vms", "VMs by phase and state", labels=["phase", "state"])
        counts: dict[tuple[str, str], int] = {}
        for vm in self.vms:
            counts[(vm.phase, vm.state)] = counts.get((vm.phase, vm.state), 0) + 1
        for (phase, state), n in sorted(counts.items()):
            by.add_metric([phase, state], n)
        yield by
        start = HistogramMetricFamily(
            "thinair_vm_time_to_running_seconds",
            "Seconds from a start request to a running VM (each VM's last start)",
            labels=[],
        )
        times = [vm.last_start_seconds for vm in self.vms if vm.last_start_seconds is not None]
        _add_histogram(start, [], times, START_BUCKETS)
        yield start

    def _jobs(self) -> Iterable[Metric]:
        by = GaugeMetricFamily("thinair_jobs", "Jobs by kind and state", labels=["kind", "state"])
        counts: dict[tuple[str, str], int] = {}
        durations: dict[tuple[str, str], list[float]] = {}
        for job in self.jobs:
            counts[(job.kind, job.state)] = counts.get((job.kind, job.state), 0) + 1
            if job.finished_at is not None:
                took = (job.finished_at - job.created_at).total_seconds()
                durations.setdefault((job.kind, job.state), []).append(max(took, 0.0))
        for (kind, state), n in sorted(counts.items()):
            by.add_metric([kind, state], n)
        yield by
        flows = HistogramMetricFamily(
            "thinair_flow_duration_seconds",
            "Seconds from submission to end of each finished flow (job), by kind and outcome",
            labels=["kind", "state"],
        )
        for (kind, state), values in sorted(durations.items()):
            _add_histogram(flows, [kind, state], values, FLOW_BUCKETS)
        yield flows
        labels = ["job_id", "vm"]  # not "job": Prometheus gives its targets that label
        copied = GaugeMetricFamily(
            "thinair_import_copied_bytes", "Bytes copied so far by a running import", labels=labels
        )
        total = GaugeMetricFamily(
            "thinair_import_total_bytes", "Bytes a running import copies in all", labels=labels
        )
        rate = GaugeMetricFamily(
            "thinair_import_rate_bytes_per_second",
            "Copy rate of a running import (bytes per second since it started)",
            labels=labels,
        )
        names = {vm.id: vm.name for vm in self.vms}
        for job in self.jobs:
            if job.kind != "import" or job.state != "running":
                continue
            which = [job.id, names.get(job.vm_id or "", job.vm_id or "")]
            progress = job.progress
            for family, key in ((copied, "done"), (total, "total"), (rate, "rate")):
                if isinstance(progress.get(key), int | float):
                    family.add_metric(which, float(progress[key]))
        yield from (copied, total, rate)

    def _exports(self) -> Iterable[Metric]:
        labels = ["export", "name", "protocol"]
        up = GaugeMetricFamily(
            "thinair_export_up", "1 while the export's server runs", labels=labels
        )
        clients = GaugeMetricFamily(
            "thinair_export_clients", "Connections open to the export now", labels=labels
        )
        read = CounterMetricFamily(
            "thinair_export_read_bytes",
            "Image bytes the export's server read for its clients since it started",
            labels=labels,
        )
        for e in self.exports:
            values = [e.id, e.name, e.protocol]
            up.add_metric(values, 1 if e.state == "running" else 0)
            if e.clients is not None:
                clients.add_metric(values, e.clients)
            if e.bytes_read is not None:
                read.add_metric(values, e.bytes_read)
        yield from (up, clients, read)

    def _sources(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "thinair_external_source_up",
            "1 when the server behind a VM's external disk answers, 0 when it does not",
            labels=["vm", "disk", "url"],
        )
        for (vm, disk), (url, answers) in sorted(self.sources.items()):
            up.add_metric([vm, disk, url], 1 if answers else 0)
        yield up

    def _lag(self) -> Iterable[Metric]:
        last = GaugeMetricFamily(
            "thinair_event_loop_lag_seconds", "How late the event loop ran a timer, last seen"
        )
        last.add_metric([], self.lag.last)
        yield last
        hist = HistogramMetricFamily(
            "thinair_event_loop_lag_observed_seconds",
            f"How late the event loop ran a timer, every {LAG_INTERVAL} s",
        )
        cumulative: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(LAG_BUCKETS, self.lag.counts, strict=False):
            running += n
            cumulative.append((str(float(bound)), float(running)))
        cumulative.append(("+Inf", float(sum(self.lag.counts))))
        hist.add_metric([], cumulative, sum_value=self.lag.total)
        yield hist


def _collect(ctx: EngineContext, lag: LoopLag, probe: SourceProbe) -> bytes:
    vm_list = vms.list_all(ctx)
    external = {
        (vm.name, d.target): d.external_disk.url
        for vm in vm_list
        for d in vm.disks
        if d.location == "external" and d.external_disk is not None
    }
    answers = probe.answers(set(external.values()))
    sources = {key: (_shown(url), answers[url]) for key, url in external.items() if url in answers}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        EngineCollector(vm_list, ctx.jobs.list(), exports.list_all(ctx), sources, lag)
    )
    return generate_latest(registry)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
)
async def metrics(request: Request, ctx: Ctx) -> Response:
    """The engine's metrics in Prometheus' text format (any token, read-only will do)."""
    state = request.app.state  # the lag watcher and the source cache live with the app
    if not hasattr(state, "metrics_lag"):
        state.metrics_lag, state.metrics_sources = LoopLag(), SourceProbe()
    state.metrics_lag.ensure_running()
    body = await run_in_threadpool(_collect, ctx, state.metrics_lag, state.metrics_sources)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
