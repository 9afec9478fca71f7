"""The service's settings: one validated model, read from flags and the environment at start.

Everything the API process keeps on disk lives under ``data_dir``: the SQLite job store (unless
``db_url`` names another database), the generated admin token, the key that seals secrets in
stored specs, and the embedded Ray head's address file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, SecretStr

from .defaults import DEFAULT_HOST, DEFAULT_PORT


class Settings(BaseModel):
    """How one service process runs. Built by :meth:`from_env` (flags override)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data_dir: Path = Field(Path(".cicw-service"), description="State of this service (store, token, keys).")
    db_url: str | None = Field(None, description="SQLAlchemy URL of the job store; a SQLite file in data_dir "
                                                 "if unset; postgresql://... for several replicas.")
    ray_address: str | None = Field(None, description="An existing Ray cluster (host:port); unset: an embedded "
                                                      "local head, started once and reused across restarts.")
    ray_num_cpus: PositiveInt | None = Field(None, description="CPUs of the embedded head (default: all).")
    host: str = DEFAULT_HOST
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    api_tokens: SecretStr | None = Field(None, description="'scope:token' pairs separated by commas "
                                                           "(scope: admin or read).")
    tokens_file: Path | None = Field(None, description="A file of 'scope token' lines (# comments).")
    secret_key: SecretStr | None = Field(None, description="Fernet key sealing spec secrets in the store; "
                                                           "replicas sharing a database must share it.")
    cors_origins: tuple[str, ...] = Field((), description="Origins allowed by CORS; none: CORS off.")
    max_body_bytes: PositiveInt = Field(16 << 20, description="Larger request bodies get 413.")
    model_packages: tuple[str, ...] = Field((), description="Packages whose model factories specs may name.")
    sync_interval_s: PositiveFloat = Field(1.0, description="How often job drivers are polled for reports.")
    lost_driver_grace_s: PositiveFloat = Field(
        30.0, description="An active job whose driver is missing for this long is failed as lost.")

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{(self.data_dir / 'jobs.db').resolve()}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from ``CICW_*`` variables; ``overrides`` (flags given) win, None ones are ignored."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        names = {"data_dir": "CICW_DATA_DIR", "db_url": "CICW_DB_URL", "ray_address": "CICW_RAY_ADDRESS",
                 "api_tokens": "CICW_API_TOKENS", "tokens_file": "CICW_TOKENS_FILE",
                 "secret_key": "CICW_SECRET_KEY", "max_body_bytes": "CICW_MAX_BODY_BYTES"}
        for field, var in names.items():
            if env.get(var):
                values[field] = env[var]
        if env.get("CICW_CORS_ORIGINS"):
            values["cors_origins"] = tuple(o.strip() for o in env["CICW_CORS_ORIGINS"].split(",") if o.strip())
        if env.get("CICW_MODEL_PACKAGES"):
            values["model_packages"] = tuple(p.strip() for p in env["CICW_MODEL_PACKAGES"].split(",") if p.strip())
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)
