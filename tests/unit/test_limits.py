"""Limits on a real engine process: event streams and console long-polls are
bounded per token (429 past the bound, other tokens unaffected), and a revoked
token's open event stream or console wait ends within seconds. (Bodies over
1 MiB: tests/unit/test_security.py.)"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import module_engine
from tests.support.engine import Engine
from thinair.api.security import CONSOLE_WAITS, EVENT_STREAMS
from thinair.client import Client


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with module_engine("limits") as (engine, base):
        (base / "sd").mkdir(mode=0o755)
        with open(base / "image.raw", "wb") as f:
            f.truncate(16 * 2**20)
        engine.start()
        c = engine.client()
        c.storage_domains.add("sd", str(base / "sd"))
        c.vms.create("i19-console", [str(base / "image.raw")], memory_mib=64)
        yield engine


def _token(engine: Engine, name: str) -> str:
    return engine.client().tokens.create(f"{name}-{uuid.uuid4().hex[:6]}").token


def _http(engine: Engine, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=f"{engine.env['THINAIR_URL']}/api/v1",
        headers={"Authorization": f"Bearer {token}"},
        timeout=httpx.Timeout(10, read=60),
    )


@contextlib.contextmanager
def _stream(h: httpx.Client) -> Iterator[httpx.Response]:
    with h.stream("GET", "/events") as r:
        if r.status_code == 200:
            lines = r.iter_lines()
            while next(lines) != "event: hello":
                pass
        yield r


def test_revoked_token_stream_closes_within_seconds(engine: Engine) -> None:
    token = _token(engine, "i19-rev")
    client = Client(url=engine.env["THINAIR_URL"], token=token, settings=engine.settings)
    seen: list[str] = []
    ended = threading.Event()

    def follow() -> None:
        for kind, _data in client.events():
            seen.append(kind)
        ended.set()

    threading.Thread(target=follow, daemon=True).start()
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen == ["hello"]
    name = next(t.name for t in engine.client().tokens.list() if t.name.startswith("i19-rev"))
    revoked = time.monotonic()
    engine.client().tokens.revoke(name)
    assert ended.wait(10), "the revoked token's event stream stayed open"
    assert time.monotonic() - revoked < 5


def test_event_streams_per_token(engine: Engine) -> None:
    token, other = _token(engine, "i19-ev"), _token(engine, "i19-ev2")
    with contextlib.ExitStack() as stack:
        for _ in range(EVENT_STREAMS.limit):
            r = stack.enter_context(_stream(stack.enter_context(_http(engine, token))))
            assert r.status_code == 200
        with _http(engine, token) as h, _stream(h) as r:
            assert r.status_code == 429
            r.read()
            assert r.json()["code"] == "too_many"
        with _http(engine, other) as h, _stream(h) as r:  # another token is not held up
            assert r.status_code == 200
    # Closed streams are given back.
    deadline = time.monotonic() + 10
    while True:
        with _http(engine, token) as h, _stream(h) as r:
            if r.status_code == 200:
                break
        assert time.monotonic() < deadline, "closed event streams were not given back"
        time.sleep(0.2)


def test_console_long_polls_per_token(engine: Engine) -> None:
    token, other = _token(engine, "i19-con"), _token(engine, "i19-con2")

    def wait(t: str, seconds: float) -> int:
        with _http(engine, t) as h:
            return h.get(f"/vms/i19-console/console?wait={seconds}").status_code

    with ThreadPoolExecutor(CONSOLE_WAITS.limit) as pool:
        waits = [pool.submit(wait, token, 6) for _ in range(CONSOLE_WAITS.limit)]
        time.sleep(1.5)  # all of them waiting
        started = time.monotonic()
        assert wait(token, 5) == 429
        assert time.monotonic() - started < 2  # refused at once, not after waiting
        assert wait(other, 0.5) == 200
        assert [w.result() for w in waits] == [200] * CONSOLE_WAITS.limit
    assert wait(token, 0.2) == 200


def test_revoked_token_console_wait_ends(engine: Engine) -> None:
    token = _token(engine, "i19-conrev")
    name = next(t.name for t in engine.client().tokens.list() if t.name.startswith("i19-conrev"))
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        answer = pool.submit(
            lambda: _http(engine, token).get("/vms/i19-console/console?wait=30").status_code
        )
        time.sleep(0.5)
        engine.client().tokens.revoke(name)
        assert answer.result(timeout=10) == 401
        assert time.monotonic() - started < 6
