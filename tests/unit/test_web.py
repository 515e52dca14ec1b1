"""The web UI is served by the engine itself: its static files need no token, the
API behind it still does; and the URI check the New VM dialog makes as one types."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.conftest import Engine


def test_ui_is_served_without_token_api_is_not(test_engine: Engine) -> None:
    base = f"http://127.0.0.1:{test_engine.port}"
    with httpx.Client(base_url=base) as http:
        root = http.get("/")
        assert root.status_code == 307 and root.headers["location"] == "/ui/"
        page = http.get("/ui/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert '<script src="app.js"' in page.text and 'id="sign-in"' in page.text
        for name, kind in [("app.js", "javascript"), ("app.css", "text/css")]:
            r = http.get(f"/ui/{name}")
            assert r.status_code == 200 and kind in r.headers["content-type"], name
        assert http.get("/ui", follow_redirects=True).text == page.text
        assert http.get("/ui/nothing.js").status_code == 404
        assert http.get("/ui/../api/v1/vms").status_code == 401
        for method, path in [("GET", "/api/v1/vms"), ("POST", "/api/v1/probe")]:
            r = http.request(method, path, json={"url": "/dev/null"})
            assert r.status_code == 401 and r.json()["code"] == "unauthorized", path
        token = (test_engine.home / "token").read_text().strip()
        r = http.get("/api/v1/vms", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json() == []
        assert "/" not in http.get("/api/v1/openapi.json").json()["paths"]


def test_probe(test_engine: Engine, raw_image: Path, workdir: Path, storage_dir: Path) -> None:
    c = test_engine.client()
    found = c.disks.probe(str(raw_image))
    assert (found.url, found.format, found.virtual_size) == (str(raw_image), "raw", 64 * 2**20)
    assert found.read_only is None  # a local file: nothing says

    token = (test_engine.home / "token").read_text().strip()
    http = httpx.Client(
        base_url=f"http://127.0.0.1:{test_engine.port}/api/v1",
        headers={"Authorization": f"Bearer {token}"},
    )

    def probe(**body: object) -> httpx.Response:
        return http.post("/probe", json=body)

    for body, status, words in [
        ({"url": str(workdir / "missing.raw")}, 422, "No such file"),
        ({"url": "gopher://x/y"}, 400, "gopher"),
        ({"url": str(raw_image), "format": "floppy"}, 400, "unknown disk format"),
        ({"url": str(raw_image), "format": "qcow2"}, 422, "cannot read"),
        ({"url": "nbd://127.0.0.1:1/none"}, 422, "cannot read nbd://127.0.0.1:1/none"),
    ]:
        r = probe(**body)
        assert r.status_code == status and words in r.json()["message"], (body, r.text)
    # A probe creates nothing.
    assert c.vms.list() == [] and list(storage_dir.iterdir()) == []


def test_long_poll_takes_the_times_the_api_gives(
    test_engine: Engine, raw_image: Path, storage_dir: Path
) -> None:
    """The page long-polls a job with `since` set to the `updated_at` the API gave
    it, time zone and all; naive times (UTC) work as well."""
    c = test_engine.client()
    c.storage_domains.add("sd", str(storage_dir))
    c.vms.create("web-poll", disks=[str(raw_image)])
    token = (test_engine.home / "token").read_text().strip()
    with httpx.Client(
        base_url=f"http://127.0.0.1:{test_engine.port}/api/v1",
        headers={"Authorization": f"Bearer {token}"},
    ) as http:
        job = http.post("/vms/web-poll/import", json={"to": "sd"}).json()
        assert job["updated_at"].endswith("Z")
        for since in [
            job["updated_at"],
            job["updated_at"].rstrip("Z"),
            "2000-01-01T00:00:00+02:00",
        ]:
            r = http.get(f"/jobs/{job['id']}", params={"wait": 5, "since": since})
            assert r.status_code == 200, (since, r.text)
            assert r.json()["updated_at"].endswith("Z")
    assert c.jobs.wait(job["id"]).state == "succeeded"
