"""The SDK sends a GET again when the engine closed the kept-alive connection
it went out on (uvicorn closes idle ones), never a request that changes
something."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from thinair.client import Client, EngineUnreachable

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


def _request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture
def engine_closing_idle() -> Iterator[tuple[str, list[bytes]]]:
    """Answers one request, then closes that connection on the next one
    without an answer; answers on the next connection."""
    server = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def serve() -> None:
        first, _ = server.accept()
        seen.append(_request(first))
        first.sendall(OK)
        seen.append(_request(first))
        first.close()  # no answer: the kept-alive connection is gone
        server.settimeout(5)
        try:
            second, _ = server.accept()
        except OSError:  # no second connection: timed out, or closed by the test
            return
        seen.append(_request(second))
        second.sendall(OK)
        second.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", seen
    server.close()
    thread.join(5)


def test_a_get_is_sent_again(engine_closing_idle: tuple[str, list[bytes]]) -> None:
    url, seen = engine_closing_idle
    c = Client(url, token="t")
    assert c.request("GET", "/jobs/1") == {}
    assert c.request("GET", "/jobs/1") == {}
    assert [r.split(b" ")[0] for r in seen] == [b"GET", b"GET", b"GET"]


def test_a_post_is_not(engine_closing_idle: tuple[str, list[bytes]]) -> None:
    url, seen = engine_closing_idle
    c = Client(url, token="t")
    assert c.request("GET", "/vms") == {}
    with pytest.raises(EngineUnreachable):
        c.request("POST", "/vms/web1/start")
    assert [r.split(b" ")[0] for r in seen] == [b"GET", b"POST"]
