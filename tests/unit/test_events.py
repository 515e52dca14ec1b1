"""Live updates: GET /api/v1/events (server-sent events) and the console's
long-poll, on libvirt's test driver (whose domains report lifecycle events as
QEMU's do)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Engine
from thinair.client import Client, ThinairAPIError

Event = tuple[str, dict[str, Any]]


def _until(events: Iterator[Event], wanted: Callable[[Event], bool], seen: list[Event]) -> Event:
    deadline = time.monotonic() + 30  # pings every 15 s keep the loop turning
    for event in events:
        seen.append(event)
        if wanted(event):
            return event
        assert time.monotonic() < deadline, f"no such event in {seen}"
    raise AssertionError(f"the stream ended; seen {seen}")


def test_events_follow_vms_and_jobs(
    test_engine: Engine, storage_dir: Path, raw_image: Path
) -> None:
    c = test_engine.client()
    c.storage_domains.add("sd", str(storage_dir))
    token = (test_engine.home / "token").read_text().strip()
    url = f"http://127.0.0.1:{test_engine.port}/api/v1/events"
    assert httpx.get(url).status_code == 401  # a token, as for every API call
    with pytest.raises(ThinairAPIError) as e:
        next(Client(test_engine.settings.url, token="wrong").events())
    assert e.value.status == 401

    with httpx.stream("GET", url, headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")

    seen: list[Event] = []
    events = c.events()  # the SDK reads the same stream
    try:
        assert next(events) == ("hello", {})

        vm = c.vms.create("bl-ev", disks=[str(raw_image), "size=8M"])
        _until(events, lambda e: e == ("vm", {"id": vm.id, "name": "bl-ev"}), seen)

        # A state change, as libvirt reports it.
        c.vms.start("bl-ev")
        _until(events, lambda e: e[0] == "vm" and e[1].get("state") == "running", seen)
        c.vms.stop("bl-ev", force=True)
        _until(events, lambda e: e[0] == "vm" and e[1].get("state") == "stopped", seen)

        # A job: every change, to its end.
        mark = len(seen)
        job = c.vms.import_("bl-ev", to="sd")
        ended = _until(
            events, lambda e: e[0] == "job" and e[1]["state"] not in ("pending", "running"), seen
        )
        assert ended[1]["id"] == job.id and ended[1]["state"] == "succeeded"
        assert ended[1]["progress"]["done"] == ended[1]["progress"]["total"] > 0
        # The import changed the VM's disk (before the job ended): said so too.
        assert ("vm", {"id": vm.id, "name": "bl-ev"}) in seen[mark:]
        assert ("job", "running") in [(e[0], e[1].get("state")) for e in seen[mark:]]

        c.vms.remove("bl-ev")
        _until(events, lambda e: e == ("vm", {"id": vm.id, "name": "bl-ev"}), seen)
    finally:
        events.close()
    assert all(e[0] in ("vm", "job") for e in seen), seen


def test_console_long_poll(test_engine: Engine, storage_dir: Path, raw_image: Path) -> None:
    """`wait` holds the answer until the console has something past `offset`."""
    c = test_engine.client()
    c.storage_domains.add("sd", str(storage_dir))
    vm = c.vms.create("bl-con", disks=[str(raw_image)])
    # The test driver runs no QEMU: write the console log as virtlogd would.
    log_file = Path(test_engine.settings.console_dir) / f"{vm.id}.log"
    assert not log_file.exists()

    assert c.vms.console("bl-con", 0, wait=0.5).text == ""  # nothing came: empty, offset 0
    got: dict[str, Any] = {}

    def read() -> None:
        got["chunk"] = c.vms.console("bl-con", 0, wait=30)

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.5)
    assert reader.is_alive()  # held: nothing to say yet
    log_file.write_text("booting\n")
    reader.join(30)
    assert got["chunk"].text == "booting\n" and got["chunk"].offset == 8
    # Past the end: held again until more comes.
    with log_file.open("a") as f:
        f.write("login: ")
    assert c.vms.console("bl-con", 8, wait=30).text == "login: "
    # A log that began anew (the VM restarted) is read from its start at once.
    log_file.write_text("again\n")
    chunk = c.vms.console("bl-con", 15, wait=30)
    assert (chunk.text, chunk.offset) == ("again\n", 6)


def _read_events(r: httpx.Response) -> Iterator[tuple[str, str, str]]:
    """(event, id, data) from a raw server-sent events stream."""
    kind, event_id, data = "message", "", ""
    for line in r.iter_lines():
        if line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()
        elif not line and data:
            yield kind, event_id, data
            kind, event_id, data = "message", "", ""


def test_events_replay_and_revoked_tokens(test_engine: Engine, storage_dir: Path) -> None:
    c = test_engine.client()
    c.storage_domains.add("sd", str(storage_dir))
    url = f"http://127.0.0.1:{test_engine.port}/api/v1/events"
    secret = c.tokens.create("i18-watcher", read_only=True).token
    headers = {"Authorization": f"Bearer {secret}"}
    with httpx.stream("GET", url, headers=headers, timeout=30) as r:
        events = _read_events(r)
        assert next(events)[0] == "hello"
        c.vms.create("bl-i18-a", disks=["size=1M"])
        kind, first_id, _ = next(events)
        assert kind == "vm" and first_id
    # Missed while away: replayed after the last id seen, then nothing twice.
    c.vms.create("bl-i18-b", disks=["size=1M"])
    c.vms.remove("bl-i18-b")
    with httpx.stream("GET", url, headers={**headers, "Last-Event-ID": first_id}, timeout=30) as r:
        events = _read_events(r)
        assert next(events)[0] == "hello"
        replayed = [next(events), next(events)]
        assert [json.loads(d)["name"] for _k, _i, d in replayed] == ["bl-i18-b", "bl-i18-b"]
        seq = int(first_id.rpartition(":")[2])
        assert [int(i.rpartition(":")[2]) for _k, i, _d in replayed] == [seq + 1, seq + 2]
    # An id from another run of the engine (or too old): resync.
    with httpx.stream("GET", url, headers={**headers, "Last-Event-ID": "0:1"}, timeout=30) as r:
        events = _read_events(r)
        assert next(events)[0] == "hello"
        assert next(events)[0] == "resync"
        # Revoking the token ends its open stream, within a few seconds.
        began = time.monotonic()
        c.tokens.revoke("i18-watcher")
        kind, _id, data = next(events)
        assert kind == "unauthorized" and "revoked" in json.loads(data)["message"]
        assert time.monotonic() - began < 15
        assert next(events, None) is None
