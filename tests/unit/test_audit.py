"""The audit trail, on a real engine process: every change asked for, done or
refused, is recorded with the time, the token's name, the client's address,
the action, its target and the outcome; reads are not; only an admin token
reads the log, through the API, the SDK and the CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from tests.conftest import module_engine
from tests.support.engine import Engine
from thinair.cli import app
from thinair.client import Client, ThinairAPIError


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with module_engine("audit") as (engine, base):
        (base / "sd").mkdir(mode=0o755)
        with open(base / "image.raw", "wb") as f:
            f.truncate(16 * 2**20)
        engine.start()
        yield engine


def _as(engine: Engine, token: str) -> Client:
    return Client(url=engine.env["THINAIR_URL"], token=token, settings=engine.settings)


def test_changes_are_recorded_and_reads_are_not(engine: Engine) -> None:
    admin = engine.client()
    base = engine.home.parent
    started = datetime.now(UTC) - timedelta(seconds=1)
    admin.storage_domains.add("sd", str(base / "sd"))
    rw = _as(engine, admin.tokens.create("i19-rw").token)
    ro = _as(engine, admin.tokens.create("i19-ro", read_only=True).token)

    rw.vms.create("i19-a", [str(base / "image.raw")], memory_mib=64)
    rw.vms.list()  # a read: not recorded
    with pytest.raises(ThinairAPIError):
        ro.vms.create("i19-b", [str(base / "image.raw")], memory_mib=64)
    with pytest.raises(ThinairAPIError):
        rw.disks.probe("/etc/shadow")
    with pytest.raises(ThinairAPIError):
        _as(engine, "not-a-token").vms.remove("i19-a")
    admin.tokens.revoke("i19-rw")
    with pytest.raises(ThinairAPIError):
        rw.vms.remove("i19-a")

    log = [e for e in admin.audit(limit=1000) if e.at >= started]
    seen = [(e.token, e.action, e.target, e.outcome, e.status) for e in reversed(log)]
    assert seen == [
        ("admin", "add_storage_domain", "sd", "ok", 201),
        ("admin", "create_token", "i19-rw", "ok", 201),
        ("admin", "create_token", "i19-ro", "ok", 201),
        ("i19-rw", "create_vm", "i19-a", "ok", 201),
        ("i19-ro", "create_vm", "i19-b", "refused", 403),
        ("i19-rw", "probe_disk", "/etc/shadow", "refused", 400),
        (None, "remove_vm", "i19-a", "refused", 401),
        ("admin", "revoke_token", "i19-rw", "ok", 200),
        (None, "remove_vm", "i19-a", "refused", 401),  # revoked: no token any more
    ]
    assert all(e.client == "127.0.0.1" and e.at <= datetime.now(UTC) for e in log)
    by_action = {(e.action, e.token): e for e in log}
    assert "outside the directories" in (by_action["probe_disk", "i19-rw"].message or "")
    assert "read-only" in (by_action["create_vm", "i19-ro"].message or "")
    assert by_action["create_vm", "i19-rw"].message is None
    assert [e.action for e in admin.audit(token="i19-ro")] == ["create_vm"]
    assert {e.action for e in admin.audit(action="create_token")} == {"create_token"}


def test_admin_only(engine: Engine) -> None:
    """The audit log, and making or revoking tokens, are for admin tokens."""
    admin = engine.client()
    other = admin.tokens.create("i19-other")
    with pytest.raises(ThinairAPIError) as e:
        _as(engine, other.token).audit()
    assert e.value.status == 403 and "admin" in e.value.message
    token = (engine.home / "token").read_text().strip()
    r = httpx.get(
        f"{engine.env['THINAIR_URL']}/api/v1/audit",
        headers={"Authorization": f"Bearer {other.token}"},
    )
    assert r.status_code == 403
    r = httpx.get(
        f"{engine.env['THINAIR_URL']}/api/v1/audit?limit=1",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 200 and len(r.json()) == 1
    rw = _as(engine, other.token)  # a read-write token neither mints nor revokes tokens
    for call in (lambda: rw.tokens.create("i19-mine"), lambda: rw.tokens.revoke("admin")):
        with pytest.raises(ThinairAPIError) as e:
            call()
        assert e.value.status == 403
    assert all(t.revoked_at is None for t in admin.tokens.list() if t.name == "admin")
    for reserved in ("admin", "admin-x"):  # no token can pass for an engine's own
        with pytest.raises(ThinairAPIError) as e:
            admin.tokens.create(reserved)
        assert e.value.status == 400


def test_cli(engine: Engine) -> None:
    engine.client().tokens.create("i19-cli")
    runner = CliRunner()
    result = runner.invoke(app, ["audit", "--json", "--action", "create_token"], env=engine.env)
    assert result.exit_code == 0, result.output
    entries = json.loads(result.output)
    assert entries[0]["target"] == "i19-cli" and entries[0]["token"] == "admin"
    assert set(entries[0]) >= {"at", "token", "client", "action", "target", "outcome"}
    result = runner.invoke(app, ["audit", "--limit", "3"], env=engine.env)
    assert result.exit_code == 0 and "create_token" in result.output, result.output
    assert "i19-cli" in result.output
    other = engine.client().tokens.create("i19-cli-rw").token
    result = runner.invoke(app, ["audit"], env={**engine.env, "THINAIR_TOKEN": other})
    assert result.exit_code == 1 and "admin" in result.output, result.output


def test_markup_in_a_target_is_text(engine: Engine) -> None:
    """The CLI's table prints what a client sent as it is, not as Rich markup."""
    with pytest.raises(ThinairAPIError):
        engine.client().disks.probe("[red]x[/red]")
    result = CliRunner().invoke(app, ["audit", "--limit", "1"], env=engine.env)
    assert "[red]x[/red]" in result.output, result.output


def test_home_is_private(engine: Engine) -> None:
    assert (Path(engine.home) / "token").stat().st_mode & 0o777 == 0o600


def test_a_body_it_cannot_read_is_recorded_still(engine: Engine) -> None:
    token = (engine.home / "token").read_text().strip()
    r = httpx.post(
        f"{engine.env['THINAIR_URL']}/api/v1/vms",
        content=b"[" * 10000 + b"]" * 10000,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    assert 400 <= r.status_code < 500
    last = engine.client().audit(limit=1)[0]
    assert (last.action, last.target, last.outcome) == ("create_vm", None, "refused")
