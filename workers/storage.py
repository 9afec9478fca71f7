"""Checkpoint storage locations as people may see them. Imports nothing heavy."""

from __future__ import annotations


def redact_uri(location: str) -> str:
    """``location`` without a URI's query and userinfo, where credentials live
    (s3://key:secret@bucket/..., ?access_key=...): what logs, errors and responses may show.

    >>> redact_uri("s3://AKIA:secret@bucket/ckpt?endpoint_override=h:9000&secret_key=x")
    's3://bucket/ckpt'
    >>> redact_uri("/var/lib/ckpt")
    '/var/lib/ckpt'
    """
    if "://" not in location:
        return location
    scheme, rest = location.split("://", 1)
    authority, slash, path = rest.partition("?")[0].partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"
