"""The service's domain errors: each carries the HTTP status and stable error code it is answered
with, so one handler renders every error body. All subclass workers' CicwStreamError (one root)."""

from __future__ import annotations

from workers.errors import CicwStreamError


class ServiceError(CicwStreamError):
    """An error the API answers with ``status_code`` and ``code``; ``field`` names the request
    field at fault, when one is."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class NotFound(ServiceError):
    """The named resource does not exist."""

    status_code = 404
    code = "not_found"


class Conflict(ServiceError):
    """The request conflicts with the resource's current state."""

    status_code = 409
    code = "conflict"


class InvalidRequest(ServiceError):
    """The request is well-formed but its content is refused."""

    status_code = 422
    code = "invalid_request"
