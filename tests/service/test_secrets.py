"""Secrets in job specs: found, sealed before they are stored (never in clear in the database),
unsealed for relaunching, masked for showing; the sealing key's file."""

from __future__ import annotations

import copy
import json
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import text

from service.core.db import make_engine, migrate, session_factory
from service.core.secrets import SecretError, SecretSealer, mask, secret_paths
from service.jobs.repository import JobRepository

SECRETS = ["pw-sasl", "pw-key-file", "oauth-secret", "-----BEGIN PRIVATE KEY-----x", "AKIDEXAMPLE", "s3cr3t/Key+",
           "TOKEN123", "userpass"]


def job_spec(storage_path: str = "s3://AKIDEXAMPLE:s3cr3t%2FKey%2B@bucket/ckpt?region=eu-west-1&session_token=TOKEN123"
             ) -> dict[str, Any]:
    return {
        "job_id": "j",
        "source": {"topic": "t", "bootstrap_servers": "k:9092", "client_config": {
            "security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN", "sasl.username": "alice",
            "sasl.password": "pw-sasl", "ssl.key.password": "pw-key-file",
            "sasl.oauthbearer.client.secret": "oauth-secret", "SSL.Key.PEM": "-----BEGIN PRIVATE KEY-----x",
        }},
        "checkpoint": {"every_s": 30, "storage_path": storage_path},
        "model": {"name": "mlp", "options": {"hidden": [64]}},
    }


def test_secret_paths_finds_client_secrets_and_a_storage_uri_with_credentials() -> None:
    assert sorted(secret_paths(job_spec())) == sorted([
        ("source", "client_config", "sasl.password"), ("source", "client_config", "ssl.key.password"),
        ("source", "client_config", "sasl.oauthbearer.client.secret"), ("source", "client_config", "SSL.Key.PEM"),
        ("checkpoint", "storage_path"),
    ])


@pytest.mark.parametrize("storage_path", ["s3://u:p@b/x", "s3://b/x?access_key=A&secret_key=S", "gs://b/x?token=T",
                                          "s3://b/x?aws_session_token=T", "s3://b/x?Password=P"])
def test_storage_uris_with_any_credential_are_secret(storage_path: str) -> None:
    assert ("checkpoint", "storage_path") in secret_paths(job_spec(storage_path))


@pytest.mark.parametrize("storage_path", ["./checkpoints", "/data/ck", "s3://bucket/ck?region=eu-west-1",
                                          "s3://user@bucket/ck"])
def test_storage_uris_without_credentials_are_not(storage_path: str) -> None:
    assert ("checkpoint", "storage_path") not in secret_paths(job_spec(storage_path))


def test_seal_then_unseal_gives_the_spec_back_and_touches_no_caller_dict() -> None:
    spec = job_spec()
    original = copy.deepcopy(spec)
    sealer = SecretSealer(Fernet.generate_key())
    sealed = sealer.seal(spec)
    text_of_sealed = json.dumps(sealed)
    assert not [s for s in SECRETS if s in text_of_sealed]
    assert "bucket" not in text_of_sealed  # a URI with credentials is sealed whole
    assert sealed["source"]["client_config"]["sasl.username"] == "alice"  # not a secret
    assert set(sealed["source"]["client_config"]["sasl.password"]) == {"$sealed"}
    sealed_copy = copy.deepcopy(sealed)
    assert sealer.unseal(sealed) == original
    assert spec == original and sealed == sealed_copy


def test_unseal_with_another_key_names_the_field() -> None:
    sealed = SecretSealer(Fernet.generate_key()).seal(job_spec())
    with pytest.raises(SecretError, match=r"source\.client_config\.[a-zA-Z.]+.*another key") as info:
        SecretSealer(Fernet.generate_key()).unseal(sealed)
    assert info.value.field is not None and info.value.field.startswith("source.client_config.")


def test_a_corrupt_sealed_value_names_the_field() -> None:
    sealer = SecretSealer(Fernet.generate_key())
    sealed = sealer.seal(job_spec())
    sealed["checkpoint"]["storage_path"] = {"$sealed": "garbage"}
    with pytest.raises(SecretError) as info:
        sealer.unseal(sealed)
    assert info.value.field == "checkpoint.storage_path"


def test_mask_hides_every_secret_and_keeps_the_rest() -> None:
    spec = job_spec()
    original = copy.deepcopy(spec)
    masked = mask(spec)
    shown = json.dumps(masked)
    assert not [s for s in SECRETS if s in shown]
    assert masked["source"]["client_config"]["sasl.password"] == "***"
    assert masked["source"]["client_config"]["sasl.username"] == "alice"
    assert masked["checkpoint"]["storage_path"] == "s3://***@bucket/ckpt?region=eu-west-1&session_token=***"
    assert spec == original
    # A sealed spec masks the same way: tokens are not shown either.
    sealed = SecretSealer(Fernet.generate_key()).seal(spec)
    assert mask(sealed)["source"] == masked["source"]
    assert mask(sealed)["checkpoint"]["storage_path"] == "***"


def test_mask_hides_query_credentials_of_a_storage_uri() -> None:
    masked = mask(job_spec("s3://bucket/ck?access_key=AKIDEXAMPLE&secret_key=s3cr3t&region=x"))
    assert masked["checkpoint"]["storage_path"] == "s3://bucket/ck?access_key=***&secret_key=***&region=x"


def test_specs_without_the_usual_sections_pass_through() -> None:
    sealer = SecretSealer(Fernet.generate_key())
    for spec in ({}, {"source": {"client_config": None}}, {"checkpoint": {"storage_path": 3}}):
        assert secret_paths(spec) == []
        assert sealer.unseal(sealer.seal(spec)) == spec == mask(spec)


def test_the_stored_row_holds_no_secret_in_clear(store_url: str) -> None:
    engine = make_engine(store_url)
    migrate(engine)
    repo = JobRepository(session_factory(engine), SecretSealer(Fernet.generate_key()))
    created = repo.create("j", job_spec(), "h")
    with engine.connect() as connection:
        stored = connection.execute(text("SELECT * FROM jobs")).one()
    engine.dispose()
    assert not [s for s in SECRETS if s in repr(stored)]
    assert created.spec == job_spec() == repo.get("j").spec  # type: ignore[union-attr]


def test_key_file_is_created_private_then_reused(tmp_path: Path) -> None:
    key_file = tmp_path / "state" / "secret.key"
    first = SecretSealer.from_settings(None, key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    sealed = first.seal(job_spec())
    assert SecretSealer.from_settings(None, key_file).unseal(sealed) == job_spec()
    assert [p.name for p in key_file.parent.iterdir()] == ["secret.key"]  # no temporary file left


def test_the_environment_key_wins_over_the_file(tmp_path: Path) -> None:
    key_file = tmp_path / "secret.key"
    env_key = Fernet.generate_key().decode()
    sealed = SecretSealer.from_settings(env_key, key_file).seal(job_spec())
    assert not key_file.exists()
    assert SecretSealer(env_key.encode()).unseal(sealed) == job_spec()
    with pytest.raises(SecretError):
        SecretSealer.from_settings(None, key_file).unseal(sealed)


def test_processes_creating_the_key_at_once_agree_on_it(tmp_path: Path) -> None:
    key_file = tmp_path / "secret.key"
    barrier = threading.Barrier(4)
    sealers: list[SecretSealer] = []

    def create() -> None:
        barrier.wait()
        sealers.append(SecretSealer.from_settings(None, key_file))

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sealed = sealers[0].seal(job_spec())
    assert all(s.unseal(sealed) == job_spec() for s in sealers)


@pytest.mark.parametrize("key", [b"", b"short", b"x" * 44])
def test_a_key_that_is_not_a_fernet_key_is_refused(key: bytes) -> None:
    with pytest.raises(SecretError, match="Fernet key"):
        SecretSealer(key)


def test_a_key_file_without_a_key_names_the_file(tmp_path: Path) -> None:
    key_file = tmp_path / "secret.key"
    key_file.write_text("not a key\n")
    with pytest.raises(SecretError, match=r"secret\.key holds no Fernet key"):
        SecretSealer.from_settings(None, key_file)
