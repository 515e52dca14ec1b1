"""API tokens: stored hashed; the engine's first start writes an admin token to
THINAIR_HOME/token (mode 0600) so a local CLI finds it without anyone typing it."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

from sqlalchemy import select

from thinair.db.models import ApiToken, utcnow
from thinair.engine.context import EngineContext

ADMIN = "admin"


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def ensure_admin_token(ctx: EngineContext) -> None:
    path = ctx.settings.token_file
    with ctx.db.session() as s:
        admin = s.scalar(select(ApiToken).where(ApiToken.name == ADMIN))
        if (
            path.exists()
            and admin is not None
            and admin.revoked_at is None
            and hmac.compare_digest(_hash(path.read_text().strip()), admin.token_hash)
        ):
            return
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        if admin is None:
            s.add(ApiToken(name=ADMIN, token_hash=_hash(token), read_only=False))
        else:
            admin.token_hash, admin.revoked_at = _hash(token), None


def verify(ctx: EngineContext, token: str) -> ApiToken | None:
    """The live token row matching `token`, or None."""
    with ctx.db.session() as s:
        row = s.scalar(select(ApiToken).where(ApiToken.token_hash == _hash(token)))
        if row is None or row.revoked_at is not None:
            return None
        return row


def revoke(ctx: EngineContext, name: str) -> bool:
    with ctx.db.session() as s:
        row = s.scalar(select(ApiToken).where(ApiToken.name == name))
        if row is None:
            return False
        row.revoked_at = utcnow()
        return True
