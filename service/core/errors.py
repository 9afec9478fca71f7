"""The service's exceptions: each carries its HTTP status and a stable machine-readable code, so
routes raise them and never build error responses themselves (error_handlers.py renders them).

Imports no web framework: the job driver, which runs on Ray workers, raises these too."""

from __future__ import annotations

from typing import Any

from workers.errors import CicwStreamError


class ServiceError(CicwStreamError):
    """An error the API reports to its client: ``status_code``, ``code`` and the message."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class NotFound(ServiceError):
    status_code = 404
    code = "not_found"


class Conflict(ServiceError):
    status_code = 409
    code = "conflict"


class InvalidRequest(ServiceError):
    status_code = 422
    code = "invalid_request"


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"


class Forbidden(ServiceError):
    status_code = 403
    code = "forbidden"


class PayloadTooLarge(ServiceError):
    status_code = 413
    code = "payload_too_large"


class Unavailable(ServiceError):
    status_code = 503
    code = "unavailable"


def error_body(code: str, message: str, *, field: str | None = None,
               details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ErrorBody of every error response, as JSON values."""
    return {"code": code, "message": message, "field": field, "details": details}
