"""Bearer tokens with two scopes: ``read`` (every GET) and ``admin`` (everything, including
submitting, stopping and deleting jobs, and prediction).

Tokens come from ``CICW_API_TOKENS`` or a tokens file. With neither, one admin token is generated
at first start, stored in ``data_dir/admin-token`` (mode 0600) and printed once. Only sha256
digests of tokens stay in memory, and a presented token is compared with every one of them in
constant time, so neither the comparison nor the position of a match leaks through timing."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from .errors import Forbidden, Unauthorized

# Shorter tokens are refused at start: a guessable admin token is worse than none.
MIN_TOKEN_LENGTH = 16
ADMIN_TOKEN_FILE = "admin-token"


class Scope(StrEnum):
    READ = "read"
    ADMIN = "admin"


class TokenConfigError(ValueError):
    """The configured tokens are unusable (bad scope, too short): the service refuses to start."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class TokenStore:
    """The accepted tokens, as digests with their scopes."""

    _entries: tuple[tuple[bytes, Scope], ...]

    @classmethod
    def parse(cls, pairs: list[tuple[str, str]], *, origin: str) -> TokenStore:
        """From (scope, token) pairs; raises TokenConfigError naming ``origin`` and the problem."""
        entries = []
        for n, (scope, token) in enumerate(pairs, 1):
            if scope not in Scope.__members__.values():
                raise TokenConfigError(f"{origin}: entry {n} has scope {scope!r}; use 'admin' or 'read'")
            if len(token) < MIN_TOKEN_LENGTH:
                raise TokenConfigError(f"{origin}: entry {n} token is shorter than {MIN_TOKEN_LENGTH} characters")
            entries.append((_digest(token), Scope(scope)))
        if not entries:
            raise TokenConfigError(f"{origin}: no tokens")
        return cls(tuple(entries))

    def scope_of(self, token: str) -> Scope | None:
        """The scope of ``token``, or None. Compares with every entry (no early exit)."""
        presented = _digest(token)
        found: Scope | None = None
        for digest, scope in self._entries:
            if hmac.compare_digest(presented, digest) and (found is None or scope == Scope.ADMIN):
                found = scope
        return found

    def authorize(self, authorization: str | None, needed: Scope) -> Scope:
        """The scope granted by an ``Authorization`` header value; Unauthorized (missing or wrong
        token) or Forbidden (a read token where admin is needed) otherwise."""
        if not authorization:
            raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
        kind, _, token = authorization.partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        scope = self.scope_of(token.strip())
        if scope is None:
            raise Unauthorized("invalid token")
        if needed == Scope.ADMIN and scope != Scope.ADMIN:
            raise Forbidden("this token is read-only; the request needs an admin token")
        return scope


def _pairs_from_env(value: str) -> list[tuple[str, str]]:
    pairs = []
    for item in value.replace("\n", ",").split(","):
        if item.strip():
            scope, _, token = item.strip().partition(":")
            pairs.append((scope.strip(), token.strip()))
    return pairs


def _pairs_from_file(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            scope, _, token = line.partition(" ")
            pairs.append((scope.strip(), token.strip()))
    return pairs


def load_tokens(env_tokens: str | None, tokens_file: Path | None, data_dir: Path) -> tuple[TokenStore, str | None]:
    """The token store, and the admin token if it was generated just now (to print once).

    Precedence: ``env_tokens`` (CICW_API_TOKENS), then ``tokens_file``, then the generated admin
    token in ``data_dir`` (created on first start)."""
    if env_tokens:
        return TokenStore.parse(_pairs_from_env(env_tokens), origin="CICW_API_TOKENS"), None
    if tokens_file is not None:
        if not tokens_file.is_file():
            raise TokenConfigError(f"tokens file {tokens_file} does not exist")
        return TokenStore.parse(_pairs_from_file(tokens_file), origin=str(tokens_file)), None
    path = data_dir / ADMIN_TOKEN_FILE
    if path.is_file():
        return TokenStore.parse([("admin", path.read_text().strip())], origin=str(path)), None
    token = secrets.token_urlsafe(32)
    data_dir.mkdir(parents=True, exist_ok=True)
    # Created with 0600 from the start (never world-readable, not even between open and chmod).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return TokenStore.parse([("admin", token)], origin=str(path)), token
