"""Browser hardening headers on every answer, and request bodies over 1 MiB
refused with 413 before the engine reads them, on a real engine process."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from typer.testing import CliRunner

from tests.conftest import module_engine
from tests.support.engine import Engine
from thinair.api.security import MAX_BODY
from thinair.cli import app
from thinair.client import ThinairAPIError


@pytest.fixture(scope="module")
def test_engine() -> Iterator[Engine]:
    with module_engine("security") as (engine, _base):
        engine.start()
        yield engine


@pytest.fixture
def http(test_engine: Engine) -> Iterator[httpx.Client]:
    token = (test_engine.home / "token").read_text().strip()
    with httpx.Client(
        base_url=test_engine.env["THINAIR_URL"],
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    ) as client:
        yield client


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/ui/"),
        ("GET", "/ui/app.js"),
        ("GET", "/api/v1/health"),
        ("GET", "/api/v1/vms/nope"),  # an error
        ("GET", "/api/v1/openapi.json"),
        ("POST", "/api/v1/vms"),  # a refused body
    ],
)
def test_hardening_headers(http: httpx.Client, method: str, path: str) -> None:
    r = http.request(method, path)
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    script_src = next(d for d in csp.split("; ") if d.startswith("script-src"))
    assert script_src == "script-src 'self'"  # no inline script, no eval, no other origin
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["x-frame-options"] == "DENY"


def test_headers_without_a_token(test_engine: Engine) -> None:
    r = httpx.get(f"{test_engine.env['THINAIR_URL']}/api/v1/vms")
    assert r.status_code == 401
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]


def test_events_stream_has_them_and_still_streams(http: httpx.Client) -> None:
    with http.stream("GET", "/api/v1/events") as r:
        assert r.headers["x-content-type-options"] == "nosniff"
        for line in r.iter_lines():
            if line.startswith("event:"):
                assert line == "event: hello"
                break


def test_body_over_the_limit(http: httpx.Client) -> None:
    big = b'{"name": "i19", "pad": "' + b"x" * MAX_BODY + b'"}'
    r = http.post("/api/v1/vms", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert r.json()["code"] == "too_large"
    # Streamed without a Content-Length: counted as it comes.
    r = http.post(
        "/api/v1/vms",
        content=(big[i : i + 65536] for i in range(0, len(big), 65536)),
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 413, r.text
    assert r.json() == {"code": "too_large", "message": "request body over 1 MiB"}
    assert http.get("/api/v1/vms").json() == []


def test_body_under_the_limit_is_read(http: httpx.Client) -> None:
    body = b'{"name": "i19", "pad": "' + b"x" * (MAX_BODY - 100) + b'"}'
    r = http.post("/api/v1/vms", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422  # read, and refused for what it says
    assert "pad" in r.json()["message"]


def test_body_over_the_limit_sdk_and_cli(test_engine: Engine) -> None:
    huge = "/" + "a" * MAX_BODY
    with pytest.raises(ThinairAPIError) as e:
        test_engine.client().storage_domains.add("i19-huge", huge)
    assert e.value.status == 413 and e.value.code == "too_large"
    result = CliRunner().invoke(app, ["storage", "add", "i19-huge", huge], env=test_engine.env)
    assert result.exit_code == 1 and "request body over 1 MiB" in result.output
