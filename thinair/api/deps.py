"""What every route module needs, and nothing else: the engine context (`Ctx`),
the authentication dependencies, and the mapping of errors to HTTP statuses and
JSON bodies with a stable `code` and a `message`. Route modules import this,
never each other."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from thinair import models
from thinair.api import auth
from thinair.db.models import ApiToken
from thinair.engine.context import EngineContext
from thinair.errors import (
    BackendError,
    Conflict,
    ExternalDiskError,
    InvalidInput,
    NotFound,
    StorageError,
    ThinairError,
)

log = logging.getLogger("thinair.api.app")

STATUS = {
    InvalidInput: 400,
    NotFound: 404,
    Conflict: 409,
    ExternalDiskError: 422,
    StorageError: 507,
    BackendError: 502,
}
ERRORS: dict[int | str, dict[str, object]] = {
    status: {"model": models.Error} for status in (400, 401, 403, 404, 409, 422, 502, 507)
}

_bearer = HTTPBearer(auto_error=False)


class AuthError(ThinairError):
    code = "unauthorized"


class Forbidden(ThinairError):
    code = "forbidden"


def get_ctx(request: Request) -> EngineContext:
    ctx: EngineContext = request.app.state.ctx
    return ctx


Ctx = Annotated[EngineContext, Depends(get_ctx)]


def authenticated(
    request: Request,
    ctx: Ctx,
    cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiToken:
    if cred is None or cred.scheme.lower() != "bearer":
        raise AuthError("missing bearer token (Authorization: Bearer TOKEN)")
    token = auth.verify(ctx, cred.credentials)
    if token is None:
        raise AuthError("invalid or revoked token")
    request.state.token_name = token.name  # for the audit trail
    if token.read_only and request.method not in ("GET", "HEAD", "OPTIONS"):
        raise Forbidden(f"token {token.name!r} is read-only")
    return token


def admin_only(token: Annotated[ApiToken, Depends(authenticated)]) -> None:
    if not auth.is_admin(token.name):
        raise Forbidden(f"token {token.name!r} is not an admin token (THINAIR_HOME/token)")


def install_error_handlers(app: FastAPI) -> None:
    """Every error in the API's one shape: {"code", "message"}."""

    @app.exception_handler(ThinairError)
    async def thinair_error(_request: Request, exc: ThinairError) -> JSONResponse:
        status = 500
        if isinstance(exc, AuthError):
            status = 401
        elif isinstance(exc, Forbidden):
            status = 403
        else:
            for cls, code in STATUS.items():
                if isinstance(exc, cls):
                    status = code
        return JSONResponse(status_code=status, content={"code": exc.code, "message": exc.message})

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error", exc_info=exc)
        return JSONResponse(
            status_code=500,
            content={"code": "internal", "message": f"internal error: {type(exc).__name__}: {exc}"},
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own refusals (unknown route, wrong method, a body that is not
        # JSON) in the API's one error shape.
        codes = {
            400: "invalid_input",
            404: "not_found",
            405: "method_not_allowed",
            413: "too_large",
            429: "too_many",
        }
        return JSONResponse(
            status_code=exc.status_code,
            content={"code": codes.get(exc.status_code, "http_error"), "message": str(exc.detail)},
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return JSONResponse(
            status_code=422,
            content={"code": "invalid_input", "message": "; ".join(problems) or "invalid request"},
        )
