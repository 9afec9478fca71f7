"""schemathesis over the OpenAPI schema: generated requests (valid and not) to every operation
never get a 5xx, and every response matches its declared status codes, content type and schema.
The app runs on a real SQLite store with the in-memory launcher (jobs are not trained here)."""

from __future__ import annotations

from collections.abc import Iterator

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


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[schemathesis.BaseSchema]:
    data = tmp_path_factory.mktemp("fuzz")
    # Relative checkpoint paths in generated specs resolve inside this directory, nowhere else.
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(data)
        app = create_app(Settings(data_dir=data / "state", sync_interval_s=0.2, max_body_bytes=1 << 20),
                         launcher=FakeLauncher(), tokens=TokenStore.parse([("admin", ADMIN)], origin="fuzz"))
        with TestClient(app):  # runs the lifespan: the store and the app state exist for every call
            yield schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors_and_responses_match_the_schema(case: schemathesis.Case) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN}"},
                           checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                   response_schema_conformance])


def test_the_schema_declares_the_error_body_and_bearer_auth(api_schema: schemathesis.BaseSchema) -> None:
    raw = api_schema.raw_schema
    assert raw["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    stop = raw["paths"]["/v1/jobs/{job_id}/stop"]["post"]["responses"]
    assert {"202", "401", "403", "404", "409", "422"} <= set(stop)
    assert stop["409"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
