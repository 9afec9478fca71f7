"""schemathesis over the OpenAPI schema: generated requests (valid and not) to every operation
never get a 5xx, and every response matches its declared status codes, content type and schema.
The app runs on a real SQLite store with the in-memory launcher (jobs are not trained here)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from service.core.config import Settings
from service.core.security import TokenStore

from .fake_launcher import FakeLauncher

ADMIN = "fuzz-admin-token-0123456789"
# The app holds no resources until its lifespan runs (in the fixture below), so building it here
# only fixes where its state will live.
_STATE = Path(tempfile.mkdtemp(prefix="cicw-fuzz-"))
app = create_app(Settings(data_dir=_STATE / "state", sync_interval_s=0.2, max_body_bytes=1 << 20),
                 launcher=FakeLauncher(), tokens=TokenStore.parse([("admin", ADMIN)], origin="fuzz"))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module", autouse=True)
def running_app() -> Iterator[None]:
    # Relative checkpoint paths in generated specs resolve inside the state directory, nowhere else.
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(_STATE)
        with TestClient(app):  # runs the lifespan: the store and the app state exist for every call
            yield
    shutil.rmtree(_STATE, ignore_errors=True)


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors_and_responses_match_the_schema(case: schemathesis.Case) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN}"},
                           checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                   response_schema_conformance])


def test_the_schema_declares_the_error_body_and_bearer_auth() -> None:
    raw = schema.raw_schema
    assert raw["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    stop = raw["paths"]["/v1/jobs/{job_id}/stop"]["post"]["responses"]
    assert {"202", "401", "403", "404", "409", "422"} <= set(stop)
    assert stop["409"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
