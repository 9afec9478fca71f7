"""Where the REST client finds the service and its token.

Each setting comes from the first of: a command-line flag, the environment (``CICW_URL``,
``CICW_TOKEN``, ``CICW_TIMEOUT``), the config file (``$CICW_CONFIG``, else
``$XDG_CONFIG_HOME/cicw-stream/client.yaml``, else ``~/.config/cicw-stream/client.yaml``; keys
``url``, ``token``, ``timeout_s``), the default. The token is a ``SecretStr``: it is never part of
a repr, a log line or an error message.

Torch-free and HTTP-free: the CLI resolves its configuration before importing the client.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, SecretStr, ValidationError, field_validator

from service.core.defaults import DEFAULT_URL
from workers.errors import CicwStreamError

ENV_URL, ENV_TOKEN, ENV_TIMEOUT, ENV_CONFIG = "CICW_URL", "CICW_TOKEN", "CICW_TIMEOUT", "CICW_CONFIG"
# Group/other permission bits: a file holding a token should be readable by its owner alone.
_SHARED_BITS = stat.S_IRWXG | stat.S_IRWXO


class ClientConfigError(CicwStreamError, ValueError):
    """The client's settings are unusable: a bad URL or timeout, an unreadable or malformed file."""


class ClientConfig(BaseModel):
    """The service to talk to and how."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    url: str = Field(DEFAULT_URL, description="Base URL of the service (http or https), without /v1.")
    token: SecretStr | None = Field(None, description="Bearer token; None sends no Authorization header.")
    timeout_s: PositiveFloat = Field(30.0, description="Seconds to wait for a connection or a response chunk.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be http(s)://host[:port][/prefix], got {url!r}")
        if parts.username is not None or parts.password is not None:
            # A credential in the URL would be printed in every error message that names the URL.
            raise ValueError("must not hold credentials: give the token with --token, CICW_TOKEN or the config file")
        if parts.query or parts.fragment:
            raise ValueError(f"must not have a query or fragment, got {url!r}")
        return url.strip().rstrip("/")


def default_config_path(env: Mapping[str, str]) -> Path:
    """``$CICW_CONFIG``, else ``client.yaml`` under ``$XDG_CONFIG_HOME/cicw-stream`` (~/.config)."""
    if env.get(ENV_CONFIG):
        return Path(env[ENV_CONFIG]).expanduser()
    base = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "cicw-stream" / "client.yaml"


def read_config_file(path: Path, *, warn: Callable[[str], None]) -> dict[str, Any]:
    """The file's settings (empty when the file does not exist); ``warn`` is told when a file
    holding a token is readable by group or others."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ClientConfigError(f"cannot read the client config {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ClientConfigError(f"client config {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ClientConfigError(f"client config {path} must be a mapping with url, token, timeout_s")
    unknown = sorted(set(map(str, data)) - set(ClientConfig.model_fields))
    if unknown:
        raise ClientConfigError(f"client config {path}: unknown key(s) {', '.join(unknown)} "
                                f"(allowed: {', '.join(ClientConfig.model_fields)})")
    if data.get("token") and path.stat().st_mode & _SHARED_BITS:
        warn(f"client config {path} holds a token and is accessible by group or others "
             f"(mode {stat.S_IMODE(path.stat().st_mode):o}); run: chmod 600 {path}")
    return data


def resolve_config(*, url: str | None = None, token: str | None = None, timeout_s: float | None = None,
                   env: Mapping[str, str] | None = None, warn: Callable[[str], None]) -> ClientConfig:
    """Flags (the arguments; None: not given) over the environment over the config file over the
    defaults. Empty values count as not given."""
    env = os.environ if env is None else env
    path = default_config_path(env)
    layers: list[Mapping[str, Any]] = [
        read_config_file(path, warn=warn),
        {"url": env.get(ENV_URL), "token": env.get(ENV_TOKEN), "timeout_s": env.get(ENV_TIMEOUT)},
        {"url": url, "token": token, "timeout_s": timeout_s},
    ]
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update({key: value for key, value in layer.items() if value not in (None, "")})
    try:
        return ClientConfig.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(map(str, err["loc"]))
        # The message names the field and what was wrong, never the input (it may be the token).
        raise ClientConfigError(f"client setting {field!r}: {err['msg']} (from flags, {ENV_URL}/{ENV_TOKEN}/"
                                f"{ENV_TIMEOUT} or {path})") from None
