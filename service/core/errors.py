"""The service's exceptions: each carries the HTTP status and the stable error code the API
renders, so a route never maps exceptions by hand. Rooted in workers' CicwStreamError."""

from __future__ import annotations

from workers.errors import CicwStreamError


class ServiceError(CicwStreamError):
    """Root of the service's errors; ``field`` names the request field at fault, when one is."""

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
