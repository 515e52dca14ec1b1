"""API token routes: create (the secret is shown once), list, revoke. Making
and revoking tokens is for the engines' own admin tokens: another read-write
token could otherwise mint itself new names or revoke the admin's."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from thinair import models
from thinair.api import auth
from thinair.api.deps import ERRORS, Ctx, admin_only, authenticated

router = APIRouter(
    prefix="/api/v1/tokens",
    dependencies=[Depends(authenticated)],
    responses=ERRORS,
    tags=["tokens"],
)


@router.get("", response_model=list[models.Token])
def list_tokens(ctx: Ctx) -> list[models.Token]:
    return auth.list_all(ctx)


@router.post(
    "", response_model=models.TokenCreated, status_code=201, dependencies=[Depends(admin_only)]
)
def create_token(ctx: Ctx, req: models.TokenCreate) -> models.TokenCreated:
    return auth.create(ctx, req)


@router.delete("/{name}", response_model=models.Token, dependencies=[Depends(admin_only)])
def revoke_token(ctx: Ctx, name: str) -> models.Token:
    return auth.revoke(ctx, name)
