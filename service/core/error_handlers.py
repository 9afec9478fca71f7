"""How every error becomes the same JSON body (ErrorBody): ServiceError with its status and code,
request validation as 422 naming the field at fault as a dotted path (``source.topic``,
``inputs[3]``), unknown routes and methods, and unexpected exceptions as a 500 that is logged."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import ServiceError, Unauthorized, error_body

log = logging.getLogger(__name__)


def field_path(loc: Sequence[str | int]) -> str:
    """``("body", "source", "topic")`` -> ``source.topic``; list indices as ``inputs[3]``."""
    parts: list[str] = []
    for i, item in enumerate(loc):
        if i == 0 and item in ("body", "query", "path", "header", "cookie") and len(loc) > 1:
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def validation_response(errors: Sequence[Any]) -> JSONResponse:
    """422 naming the first invalid field; every problem in ``details``."""
    details = [{"field": field_path(e.get("loc", ())), "message": e.get("msg", ""), "type": e.get("type", "")}
               for e in errors]
    first = details[0] if details else {"field": None, "message": "invalid request"}
    message = f"{first['field']}: {first['message']}" if first["field"] else str(first["message"])
    return JSONResponse(error_body("invalid_request", message, field=first["field"] or None, details=details),
                        status_code=422)


def _auth_headers(exc: ServiceError) -> dict[str, str] | None:
    return {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None


def install_error_handlers(app: FastAPI) -> None:
    """Render ServiceError, request validation, HTTP errors (unknown route, wrong method) and
    unexpected exceptions as ErrorBody."""

    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, field=exc.field), status_code=exc.status_code,
                            headers=_auth_headers(exc))

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_response(exc.errors())

    @app.exception_handler(ValidationError)
    async def _model_validation(_request: Request, exc: ValidationError) -> JSONResponse:
        return validation_response(exc.errors())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI's answer to a body it cannot decode (not UTF-8, not JSON)
            return JSONResponse(error_body("invalid_request", f"body: {exc.detail}", field="body"), status_code=422)
        codes = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        return JSONResponse(error_body(codes.get(exc.status_code, "http_error"), str(exc.detail)),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal_error", f"internal error: {type(exc).__name__}"), status_code=500)


# Declared on every route so the OpenAPI schema lists the error body (and schemathesis checks it).
def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    from service.jobs.schemas import ErrorBody

    return {status: {"model": ErrorBody} for status in statuses}
