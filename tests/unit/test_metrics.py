"""GET /metrics on the test driver: behind a token (a read-only one will do), in
Prometheus' text format, with the engine's VMs, jobs and sources."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.engine import Engine


def _scrape(engine: Engine, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"http://127.0.0.1:{engine.port}/metrics", headers=headers, timeout=30)


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_need_a_token_and_show_the_engine(
    test_engine: Engine, storage_dir: Path, raw_image: Path
) -> None:
    c = test_engine.client()
    assert _scrape(test_engine, None).status_code == 401
    assert _scrape(test_engine, "wrong").status_code == 401
    scrape = c.tokens.create("prometheus", read_only=True).token
    c.storage_domains.add("tmp", str(storage_dir))
    c.vms.create("i17-m", disks=[str(raw_image)])
    reply = _scrape(test_engine, scrape)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain; version=")
    samples = _samples(reply.text)
    assert samples[("thinair_vms", frozenset({("phase", "ready"), ("state", "stopped")}))] == 1
    assert samples[("thinair_info", frozenset({("version", "0.1.0")}))] == 1
    # The source is asked in the background: a later scrape has its answer.
    source = frozenset({("vm", "i17-m"), ("disk", "vda"), ("url", str(raw_image))})
    deadline = time.monotonic() + 20
    while ("thinair_external_source_up", source) not in samples:
        assert time.monotonic() < deadline, reply.text
        time.sleep(0.2)
        samples = _samples(_scrape(test_engine, scrape).text)
    assert samples[("thinair_external_source_up", source)] == 1
    raw_image.rename(raw_image.with_suffix(".gone"))  # the source stops answering
    deadline = time.monotonic() + 40
    while samples[("thinair_external_source_up", source)] != 0:
        assert time.monotonic() < deadline
        time.sleep(0.5)
        samples = _samples(_scrape(test_engine, scrape).text)
    assert samples[("thinair_event_loop_lag_observed_seconds_count", frozenset())] >= 0
