"""API tokens: stored hashed; the engine's first start writes an admin token to
THINAIR_HOME/token (mode 0600) so a local CLI finds it without anyone typing it."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

from sqlalchemy import select

from thinair import models
from thinair.db.models import ApiToken, aware, utcnow
from thinair.engine.context import EngineContext
from thinair.errors import Conflict, InvalidInput, NotFound

ADMIN = "admin"


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def admin_name(ctx: EngineContext) -> str:
    """The admin token of this engine. Engines sharing a database (PostgreSQL)
    each have their own, named after their machine and THINAIR_HOME, so that one
    starting does not revoke the token of another."""
    if not ctx.db.locks.shared:
        return ADMIN
    return f"{ADMIN}-{hashlib.sha256(ctx.engine_name.encode()).hexdigest()[:12]}"


def is_admin(name: str) -> bool:
    """An engine's own admin token (the one in THINAIR_HOME/token): "admin", or
    "admin-HASH" where engines share a database. No other token may take
    such a name (see create)."""
    return name == ADMIN or name.startswith(f"{ADMIN}-")


def ensure_admin_token(ctx: EngineContext) -> None:
    path = ctx.settings.token_file
    name = admin_name(ctx)
    with ctx.db.session() as s:
        admin = s.scalar(select(ApiToken).where(ApiToken.name == name))
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
            s.add(ApiToken(name=name, token_hash=_hash(token), read_only=False))
        else:
            admin.token_hash, admin.revoked_at = _hash(token), None


def verify(ctx: EngineContext, token: str) -> ApiToken | None:
    """The live token row matching `token`, or None."""
    with ctx.db.session() as s:
        row = s.scalar(select(ApiToken).where(ApiToken.token_hash == _hash(token)))
        if row is None or row.revoked_at is not None:
            return None
        return row


def is_live(ctx: EngineContext, token_id: str) -> bool:
    """Is the token still there and not revoked (for requests that stay open)?"""
    with ctx.db.session() as s:
        row = s.get(ApiToken, token_id)
        return row is not None and row.revoked_at is None


def _model(row: ApiToken) -> models.Token:
    return models.Token(
        id=row.id,
        name=row.name,
        read_only=row.read_only,
        created_at=aware(row.created_at),
        revoked_at=aware(row.revoked_at),
    )


def create(ctx: EngineContext, req: models.TokenCreate) -> models.TokenCreated:
    if is_admin(req.name):
        raise InvalidInput(f"token names {ADMIN!r} and {ADMIN}-* are the engines' own")
    token = secrets.token_urlsafe(32)
    with ctx.db.session() as s:
        if s.scalar(select(ApiToken).where(ApiToken.name == req.name)):
            raise Conflict(f"a token named {req.name!r} exists already")
        row = ApiToken(name=req.name, token_hash=_hash(token), read_only=req.read_only)
        s.add(row)
        s.flush()
        return models.TokenCreated(**_model(row).model_dump(), token=token)


def list_all(ctx: EngineContext) -> list[models.Token]:
    with ctx.db.session() as s:
        return [_model(r) for r in s.scalars(select(ApiToken).order_by(ApiToken.name))]


def revoke(ctx: EngineContext, name: str) -> models.Token:
    with ctx.db.session() as s:
        row = s.scalar(select(ApiToken).where(ApiToken.name == name))
        if row is None:
            raise NotFound(f"no token {name!r}")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
        return _model(row)
