"""What a request handler gets from the app: its state (built once in the lifespan) and the
caller's scope, as typed dependency aliases so routes declare what they need in their signature."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .security import Scope, TokenStore

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from service.jobs.model_export import ModelCache
    from service.jobs.service import JobService

    from .config import Settings


@dataclass
class AppState:
    """Resources of a running app: kept on ``app.state.cicw``, never at import time."""

    settings: Settings
    tokens: TokenStore
    jobs: JobService
    models: ModelCache
    registry: CollectorRegistry


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.cicw
    return state


StateDep = Annotated[AppState, Depends(app_state)]

# Declared in the OpenAPI schema as the bearer security scheme; errors are raised by authorize().
_bearer = HTTPBearer(auto_error=False, description="A token with the read or admin scope.")


def _require(needed: Scope) -> Callable[..., Scope]:
    def dependency(state: StateDep,
                   credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]) -> Scope:
        header = f"{credentials.scheme} {credentials.credentials}" if credentials is not None else None
        return state.tokens.authorize(header, needed)

    return dependency


ReadAccess = Annotated[Scope, Depends(_require(Scope.READ))]
AdminAccess = Annotated[Scope, Depends(_require(Scope.ADMIN))]
