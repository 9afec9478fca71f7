"""Secrets inside job specs (Kafka client passwords and keys, credentials in a checkpoint
storage URI): found by :func:`secret_paths`, sealed with Fernet before a spec is stored,
unsealed when the service relaunches the job, and masked in responses and logs.

A sealed value is ``{"$sealed": "<Fernet token>"}``; the token holds the JSON of the value, so
unsealing gives back the value as it was. A checkpoint storage URI with any credential is
sealed whole (its bucket and path included); masking hides only the credentials in it.
"""

from __future__ import annotations

import copy
import json
import os
import secrets as _random
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from cryptography.fernet import Fernet, InvalidToken

from service.core.errors import ServiceError

SEALED = "$sealed"
MASK = "***"
# Words that make a Kafka client setting a secret (sasl.password, ssl.key.pem, ...client.secret).
_SECRET_WORDS = ("password", "secret", "token", "key")
# Words that make a storage URI's query parameter a credential (pyarrow's access_key, secret_key,
# session_token; anything else named like a password).
_CREDENTIAL_PARAM_WORDS = ("access_key", "secret", "password", "token")
_CLIENT_CONFIG = ("source", "client_config")
_STORAGE_PATH = ("checkpoint", "storage_path")

Path_ = tuple[str, ...]


class SecretError(ServiceError):
    """A sealing key is unusable, or a stored secret cannot be unsealed with the key given."""

    code = "secret_error"


def secret_paths(spec: dict[str, Any]) -> list[Path_]:
    """Paths of the secret values in a job spec (as a dict): client_config settings named like a
    password, secret, token or key, and ``checkpoint.storage_path`` when it carries credentials.

    >>> secret_paths({"source": {"client_config": {"sasl.password": "p", "acks": "all"}},
    ...               "checkpoint": {"storage_path": "s3://b/ck?access_key=A&secret_key=S"}})
    [('source', 'client_config', 'sasl.password'), ('checkpoint', 'storage_path')]
    """
    paths: list[Path_] = [(*_CLIENT_CONFIG, name) for name in _client_config(spec) if _is_secret_name(name)]
    storage = _get(spec, _STORAGE_PATH)
    if isinstance(storage, str) and _uri_has_credentials(storage):
        paths.append(_STORAGE_PATH)
    return paths


def mask(spec: dict[str, Any]) -> dict[str, Any]:
    """A copy of the spec (sealed or not) with every secret replaced by ``***``; a storage URI
    keeps its scheme, host, path and other parameters, with only its credentials masked.

    >>> mask({"checkpoint": {"storage_path": "s3://id:pw@bucket/ck?secret_key=s&region=x"}})
    {'checkpoint': {'storage_path': 's3://***@bucket/ck?secret_key=***&region=x'}}
    """
    masked = copy.deepcopy(spec)
    for path in _secret_or_sealed_paths(masked):
        value = _get(masked, path)
        _set(masked, path, _mask_uri(value) if path == _STORAGE_PATH and isinstance(value, str) else MASK)
    return masked


class SecretSealer:
    """Seals and unseals the secrets of job specs with one Fernet key."""

    def __init__(self, key: bytes) -> None:
        try:
            self._fernet = Fernet(key)
        except (ValueError, TypeError) as exc:
            raise SecretError("the secret key is not a Fernet key (32 url-safe base64-encoded bytes, e.g. "
                              "from cryptography.fernet.Fernet.generate_key())") from exc

    @classmethod
    def from_settings(cls, env_key: str | None, key_file: Path) -> SecretSealer:
        """The key from the environment when set; otherwise the one in ``key_file``, which is
        created (mode 0600) with a new key when absent."""
        key, origin = ((env_key.strip().encode(), "the secret key from the environment") if env_key
                       else (_read_or_create_key(key_file), f"the secret key file {key_file}"))
        try:
            return cls(key)
        except SecretError as exc:
            raise SecretError(f"{origin} holds no Fernet key: {exc}") from exc

    def seal(self, spec: dict[str, Any]) -> dict[str, Any]:
        """A copy of the spec with each secret value replaced by ``{"$sealed": token}``."""
        sealed = copy.deepcopy(spec)
        for path in secret_paths(sealed):
            token = self._fernet.encrypt(json.dumps(_get(sealed, path)).encode()).decode()
            _set(sealed, path, {SEALED: token})
        return sealed

    def unseal(self, sealed: dict[str, Any]) -> dict[str, Any]:
        """A copy of a sealed spec with its secrets back in clear; raises SecretError naming the
        field when a value was sealed with another key or is corrupt."""
        spec = copy.deepcopy(sealed)
        for path in _secret_or_sealed_paths(spec):
            value = _get(spec, path)
            if _is_sealed(value):
                _set(spec, path, self._open(value[SEALED], path))
        return spec

    def _open(self, token: str, path: Path_) -> Any:
        try:
            return json.loads(self._fernet.decrypt(token.encode()))
        except (InvalidToken, ValueError) as exc:
            field = ".".join(path)
            raise SecretError(f"cannot unseal {field}: it was sealed with another key, or is corrupt "
                              "(is the service's secret key the one it stored this job with?)",
                              field=field) from exc


def _read_or_create_key(key_file: Path) -> bytes:
    if key_file.exists():
        return key_file.read_bytes().strip()
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key = Fernet.generate_key()
    # Written under a temporary name, then linked into place: link never replaces, so of two
    # processes creating the key at once, one wins and the other reads the winner's key.
    tmp = key_file.with_name(f".{key_file.name}.{_random.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, key + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, key_file)
    except FileExistsError:
        return key_file.read_bytes().strip()
    finally:
        tmp.unlink()
    return key


def _secret_or_sealed_paths(spec: dict[str, Any]) -> Iterator[Path_]:
    # In a sealed spec the storage URI is a {"$sealed": ...} dict, so secret_paths no longer sees it.
    yield from (p for p in secret_paths(spec) if p != _STORAGE_PATH)
    storage = _get(spec, _STORAGE_PATH)
    if _is_sealed(storage) or (isinstance(storage, str) and _uri_has_credentials(storage)):
        yield _STORAGE_PATH


def _is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def _is_credential_param(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _CREDENTIAL_PARAM_WORDS)


def _uri_has_credentials(uri: str) -> bool:
    parts = urlsplit(uri)
    if parts.password:
        return True
    return any(_is_credential_param(name) for name, _ in parse_qsl(parts.query, keep_blank_values=True))


def _mask_uri(uri: str) -> str:
    parts = urlsplit(uri)
    netloc = parts.netloc
    if parts.password is not None:  # the user too: with S3 it is the access key id
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    query = urlencode([(name, MASK if _is_credential_param(name) else value)
                       for name, value in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _is_sealed(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {SEALED} and isinstance(value[SEALED], str)


def _client_config(spec: dict[str, Any]) -> dict[str, Any]:
    config = _get(spec, _CLIENT_CONFIG)
    return config if isinstance(config, dict) else {}


def _get(spec: dict[str, Any], path: Path_) -> Any:
    node: Any = spec
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(spec: dict[str, Any], path: Path_, value: Any) -> None:
    node = spec
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
