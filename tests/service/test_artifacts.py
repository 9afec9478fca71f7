"""A job's artifacts as the service serves them, from real checkpoints: one small json-format mlp
job per module through the real broker and a local Ray (one worker, a checkpoint every 4 steps,
a clean evaluation set), then its checkpoints listed, described, resolved ("latest" = Ray
Train's registry), streamed as tar.gz and purged; its model loaded, exported as safetensors with
its card, and used to predict. The same listing, archive and model load on an S3 storage (moto's
server, the endpoint and credentials in the storage URI)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from confluent_kafka import Producer

from service.core.errors import ServiceError
from service.jobs.checkpoints import (
    CheckpointNotFound,
    InvalidCheckpointId,
    archive_stream,
    checkpoint_detail,
    display_location,
    list_checkpoints,
    purge_checkpoints,
    resolve_checkpoint,
)
from service.jobs.model_export import (
    CARD_METADATA_KEY,
    LoadedModel,
    ModelCache,
    ModelUnavailable,
    model_card,
    safetensors_bytes,
)
from service.jobs.predict import InvalidInput, predict
from service.jobs.schemas import ModelCard
from workers.kafka.broker import EmbeddedBroker
from workers.kafka.records import RawFormat
from workers.kafka.topics import ensure_topic
from workers.report import JobReport, JobResult
from workers.runner import run_job, storage_location
from workers.spec import JobSpec
from workers.train.checkpoint_meta import read_meta
from workers.train.checkpoints import STATE_FILE, load_state
from workers.train.models import build_model

pytestmark = pytest.mark.slow

DIM, CLASSES, RECORDS = 8, 3, 320


def _points(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n examples of 3 well separated classes in DIM dimensions."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    return (rng.normal(size=(n, DIM)) + 3 * np.eye(CLASSES, DIM)[y]).astype(np.float32), y


def _send(bootstrap: str, topic: str, x: np.ndarray, y: np.ndarray) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(len(x)):
        producer.produce(topic, json.dumps({"x": x[i].tolist(), "y": int(y[i])}).encode(), partition=i % 2)
    assert producer.flush(10) == 0


@dataclass(frozen=True)
class Job:
    spec: JobSpec
    result: JobResult
    reports: list[JobReport]
    storage: str


@pytest.fixture(scope="module")
def job(kafka_broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Job]:
    """One finished job with several checkpoints (20 steps, one every 4, the last 3 kept)."""
    import ray

    tmp = tmp_path_factory.mktemp("artifacts")
    topic = f"art-{uuid.uuid4().hex[:8]}"
    ensure_topic(kafka_broker.bootstrap, topic, 2)
    _send(kafka_broker.bootstrap, topic, *_points(RECORDS, seed=0))
    x_eval, y_eval = _points(60, seed=1)
    np.savez(tmp / "eval.npz", x=x_eval, y=y_eval)
    spec = JobSpec.model_validate({
        "job_id": "art-" + uuid.uuid4().hex[:6],
        "source": {"bootstrap_servers": kafka_broker.bootstrap, "topic": topic, "batch_size": 16,
                   "max_wait_s": 0.05, "metadata_timeout_s": 1.0, "stop_at": "end"},
        "codec": {"format": {"kind": "json"}, "input_shape": [DIM], "num_classes": CLASSES},
        "model": {"name": "mlp", "options": {"hidden": [16]}},
        "cicw": {"method": "cicw", "burn_in_steps": 2, "anneal_steps": 2},
        "scaling": {"num_workers": 1},
        "checkpoint": {"every_steps": 4, "keep": 3, "storage_path": str(tmp / "ckpt")},
        "evaluation": {"path": str(tmp / "eval.npz"), "every_steps": 4},
        "report_every_steps": 2, "max_failures": 0,
    })
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        reports: list[JobReport] = []
        result = run_job(spec, on_report=reports.append)
    finally:
        if started_here:
            ray.shutdown()
    assert result.state == "finished", result.error
    yield Job(spec, result, reports, storage_location(spec))


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    return ModelCache()


def _name(location: str) -> str:
    return location.partition("?")[0].rstrip("/").rpartition("/")[2]


def _copy(job: Job, tmp_path: Path) -> str:
    """A copy of the job's storage that a test may change."""
    shutil.copytree(job.storage, tmp_path / "ckpt")
    return str(tmp_path / "ckpt")


# --- checkpoints ---------------------------------------------------------------------------

def test_listing_is_newest_first_and_matches_each_meta(job: Job) -> None:
    refs = list_checkpoints(job.storage, job.spec.job_id)
    on_disk = sorted(p.name for p in Path(job.storage, job.spec.job_id).glob("checkpoint_*") if p.is_dir())
    assert sorted(r.id for r in refs) == on_disk and len(refs) == 3  # keep: 3
    assert [(r.step, r.written_at) for r in refs] == sorted(((r.step, r.written_at) for r in refs), reverse=True)
    for ref in refs:
        meta = read_meta(Path(job.storage, job.spec.job_id, ref.id))
        assert (ref.step, ref.examples, ref.written_at) == (meta.step, meta.examples, meta.written_at)
    assert refs[0].step == job.result.checkpoint_step and refs[0].examples == RECORDS
    assert list_checkpoints(job.storage, "no-such-job") == []


def test_detail_and_latest(job: Job) -> None:
    refs = list_checkpoints(job.storage, job.spec.job_id)
    for ref in refs:
        detail = checkpoint_detail(job.storage, job.spec.job_id, ref.id)
        folder = Path(job.storage, job.spec.job_id, ref.id)
        assert detail.offsets == read_meta(folder).offsets and detail.metrics is None
        assert detail.size_bytes == sum(f.stat().st_size for f in folder.iterdir())
        assert detail.model_dump(include={"id", "step", "examples", "written_at"}) == ref.model_dump()
    assert job.result.checkpoint is not None
    latest = checkpoint_detail(job.storage, job.spec.job_id, "latest")
    assert latest.id == _name(job.result.checkpoint) and latest.offsets == {0: RECORDS // 2, 1: RECORDS // 2}
    assert resolve_checkpoint(job.storage, job.spec.job_id, "latest") == job.result.checkpoint
    assert resolve_checkpoint(job.storage, job.spec.job_id, refs[-1].id) == str(
        Path(job.storage, job.spec.job_id, refs[-1].id))


@pytest.mark.parametrize("bad", ["../x", "checkpoint_..", "checkpoint_a/../b", "checkpoint_a/b", "x",
                                 "", "checkpoint_", "state.pt", "checkpoint_a\\b"])
def test_a_malformed_checkpoint_id_is_refused_naming_the_field(job: Job, bad: str) -> None:
    for call in (checkpoint_detail, resolve_checkpoint):
        with pytest.raises(InvalidCheckpointId) as caught:
            call(job.storage, job.spec.job_id, bad)
        assert (caught.value.status_code, caught.value.field) == (422, "checkpoint_id")


def test_an_unknown_checkpoint_is_not_found(job: Job, tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFound) as caught:
        checkpoint_detail(job.storage, job.spec.job_id, "checkpoint_2000-01-01_00-00-00.000000")
    assert (caught.value.status_code, caught.value.code) == (404, "checkpoint_not_found")
    with pytest.raises(CheckpointNotFound, match="no checkpoint yet"):
        resolve_checkpoint(job.storage, "no-such-job", "latest")
    # A folder without its meta.json (an upload cut short) is left out of the listing and not found.
    storage = _copy(job, tmp_path)
    (Path(storage) / job.spec.job_id / "checkpoint_partial").mkdir()
    (Path(storage) / job.spec.job_id / "checkpoint_partial" / STATE_FILE).write_bytes(b"half")
    assert "checkpoint_partial" not in [r.id for r in list_checkpoints(storage, job.spec.job_id)]
    with pytest.raises(CheckpointNotFound, match=r"no meta\.json"):
        checkpoint_detail(storage, job.spec.job_id, "checkpoint_partial")


def _unpack(chunks: list[bytes]) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks)), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def test_archive_is_streamed_in_pieces_and_extracts_to_the_checkpoint(job: Job, tmp_path: Path) -> None:
    location = resolve_checkpoint(job.storage, job.spec.job_id, "latest")
    name = _name(location)
    chunks = list(archive_stream(location, chunk_size=4096))
    assert len(chunks) > 1 and all(0 < len(c) <= 2 * 4096 for c in chunks)
    files = _unpack(chunks)
    assert files == {f"{name}/{p.name}": p.read_bytes() for p in Path(location).iterdir()}
    (tmp_path / "x").mkdir()
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks)), mode="r:gz") as tar:
        tar.extractall(tmp_path / "x", filter="data")
    state = load_state(tmp_path / "x" / name)
    assert state.meta == read_meta(location) and state.meta.step == job.result.checkpoint_step


def test_archive_of_a_large_checkpoint_is_made_as_it_is_read(job: Job, tmp_path: Path) -> None:
    # 2 MB of incompressible bytes in 64 KiB pieces: the archive comes out in about as many
    # pieces, none much larger than one, so it is never built whole before it is handed out.
    storage = _copy(job, tmp_path)
    location = resolve_checkpoint(storage, job.spec.job_id, list_checkpoints(storage, job.spec.job_id)[0].id)
    blob = np.random.default_rng(0).bytes(2 << 20)
    (Path(location) / "extra").mkdir()
    (Path(location) / "extra" / "blob.bin").write_bytes(blob)
    stream = archive_stream(location)
    first = next(stream)
    chunks = [first, *stream]
    assert len(chunks) >= (2 << 20) // (1 << 16) - 1 and max(map(len, chunks)) <= 2 * (1 << 16)
    assert _unpack(chunks)[f"{_name(location)}/extra/blob.bin"] == blob


def test_archive_of_a_missing_checkpoint_fails_before_any_byte(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFound):
        archive_stream(str(tmp_path / "checkpoint_gone"))


def test_purge_removes_the_job_folder(job: Job, tmp_path: Path) -> None:
    storage = _copy(job, tmp_path)
    assert list_checkpoints(storage, job.spec.job_id)
    purge_checkpoints(storage, job.spec.job_id)
    assert not (Path(storage) / job.spec.job_id).exists() and Path(storage).exists()
    assert list_checkpoints(storage, job.spec.job_id) == []
    purge_checkpoints(storage, job.spec.job_id)  # nothing left: fine
    with pytest.raises(ServiceError) as caught:
        purge_checkpoints(storage, "..")
    assert (caught.value.status_code, caught.value.field) == (422, "job_id")


def test_checkpoints_module_imports_without_torch_or_ray() -> None:
    code = ("import sys, service.jobs.checkpoints; "
            "print(','.join(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# --- model export ----------------------------------------------------------------------------

def test_the_cache_loads_the_checkpoints_model_and_keeps_the_most_recent(job: Job) -> None:
    locations = [resolve_checkpoint(job.storage, job.spec.job_id, r.id)
                 for r in list_checkpoints(job.storage, job.spec.job_id)]
    cache = ModelCache(capacity=2)
    loaded = cache.load(job.spec, locations[0])
    state = load_state(locations[0])
    assert (loaded.step, loaded.examples, loaded.checkpoint) == (state.meta.step, state.meta.examples, locations[0])
    assert not loaded.module.training and loaded.parameters == sum(t.numel() for t in state.model.values())
    for key, tensor in loaded.module.state_dict().items():
        torch.testing.assert_close(tensor, state.model[key], rtol=0, atol=0)
    assert cache.load(job.spec, locations[0]) is loaded
    cache.load(job.spec, locations[1])
    cache.load(job.spec, locations[2])  # the least recently used, locations[0], goes
    assert len(cache) == 2 and cache.load(job.spec, locations[0]) is not loaded


def test_threads_loading_one_checkpoint_at_once_share_one_model(job: Job) -> None:
    location = resolve_checkpoint(job.storage, job.spec.job_id, "latest")
    cache = ModelCache()
    with ThreadPoolExecutor(4) as pool:
        models = list(pool.map(lambda _: cache.load(job.spec, location), range(4)))
    assert len(cache) == 1 and all(m is models[0] for m in models)


def test_a_checkpoint_that_does_not_load_is_model_unavailable(job: Job, tmp_path: Path) -> None:
    storage = _copy(job, tmp_path)
    location = resolve_checkpoint(storage, job.spec.job_id, "latest")
    other = job.spec.model_copy(update={"model": job.spec.model.model_copy(update={"options": {"hidden": [32]}})})
    with pytest.raises(ModelUnavailable, match="does not fit model 'mlp'") as caught:
        ModelCache().load(other, location)
    assert (caught.value.status_code, caught.value.code) == (409, "model_unavailable")
    (Path(location) / STATE_FILE).write_bytes(b"not a torch file")
    with pytest.raises(ModelUnavailable, match=r"state\.pt"):
        ModelCache().load(job.spec, location)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The __metadata__ of a safetensors file: an 8-byte little-endian header length, then JSON."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length])["__metadata__"]


def test_model_card_and_safetensors_round_trip(job: Job, cache: ModelCache) -> None:
    location = resolve_checkpoint(job.storage, job.spec.job_id, "latest")
    loaded = cache.load(job.spec, location)
    # The final report covers no step of its own (no weights, no prequential accuracy): the card
    # is made from the latest report that has them, as the service would pick it.
    report = next(r for r in reversed(job.reports) if r.cicw is not None and r.eval_accuracy is not None)
    assert report.prequential_accuracy is not None and report.cicw is not None
    card = model_card(job.spec, loaded, report, "abc123")
    assert card.model_dump() == {
        "job_id": job.spec.job_id, "architecture": "mlp", "model_options": {"hidden": [16]},
        "num_classes": CLASSES, "input_shape": [DIM], "record_format": {"kind": "json"},
        "checkpoint": location, "step": job.result.checkpoint_step, "records_trained": RECORDS,
        "clean_accuracy": report.eval_accuracy, "prequential_accuracy": report.prequential_accuracy,
        "estimated_noise": report.cicw.low_weight_fraction, "class_mean_weight": report.cicw.class_mean_weight,
        "spec_hash": "abc123", "parameters": loaded.parameters}
    bare = model_card(job.spec, loaded, None, "abc123")
    assert (bare.clean_accuracy, bare.estimated_noise, bare.class_mean_weight) == (None, None, [])

    data = safetensors_bytes(loaded, card)
    tensors = safetensors.torch.load(data)
    expected = load_state(location).model
    assert tensors.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(tensors[key], tensor, rtol=0, atol=0)
    assert ModelCard.model_validate_json(_safetensors_metadata(data)[CARD_METADATA_KEY]) == card


def test_safetensors_copies_tied_weights() -> None:
    # Two keys on one storage (tied weights): safetensors refuses those unless each has its own copy.
    first, second = torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False)
    second.weight = first.weight
    module = torch.nn.Sequential(first, second)
    loaded = LoadedModel(module=module, checkpoint="c", step=0, examples=0, parameters=16)
    card = ModelCard(job_id="j", architecture="tied", num_classes=4, input_shape=[4], record_format={},
                     checkpoint="c", step=0, records_trained=0, spec_hash="h", parameters=16)
    tensors = safetensors.torch.load(safetensors_bytes(loaded, card))
    assert set(tensors) == {"0.weight", "1.weight"}
    torch.testing.assert_close(tensors["1.weight"], first.weight.detach())


# --- predict ---------------------------------------------------------------------------------

def test_predictions_are_the_models_softmax_over_several_batches(job: Job, cache: ModelCache) -> None:
    loaded = cache.load(job.spec, resolve_checkpoint(job.storage, job.spec.job_id, "latest"))
    x, y = _points(300, seed=2)  # more than one batch of 256
    # As a producer sends them, without the label, or the features alone.
    inputs: list[Any] = [{"x": row.tolist(), "y": int(label), "id": str(i)} for i, (row, label) in
                         enumerate(zip(x[:100], y))]
    inputs += [{"x": row.tolist()} for row in x[100:200]] + [row.tolist() for row in x[200:]]
    predictions = predict(loaded, job.spec, inputs)
    with torch.inference_mode():
        expected = torch.softmax(loaded.module(torch.from_numpy(x)), dim=1)
    got = torch.tensor([p.probabilities for p in predictions])
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(300))
    assert [p.label for p in predictions] == expected.argmax(dim=1).tolist()


@pytest.mark.parametrize(("bad", "reason"), [
    ({"x": [1.0, 2.0]}, "x has shape [2], expected [8]"),
    ({"y": 1}, "invalid field(s): x"),
    ({"x": [1.0] * 7 + [float("nan")]}, "NaN or infinity"),
    ({"x": ["a"] * 8}, "rectangular array of numbers"),
    ("AAAA", "expected a JSON object"),
    (True, "expected a JSON object"),
])
def test_a_bad_input_is_refused_naming_its_index(job: Job, cache: ModelCache, bad: Any, reason: str) -> None:
    loaded = cache.load(job.spec, resolve_checkpoint(job.storage, job.spec.job_id, "latest"))
    good = {"x": [0.0] * DIM}
    with pytest.raises(InvalidInput) as caught:
        predict(loaded, job.spec, [good, good, bad, good])
    assert (caught.value.status_code, caught.value.field) == (422, "inputs[2]")
    assert reason in str(caught.value) and str(caught.value).startswith("inputs[2]: ")


def test_raw_inputs_are_base64_record_bytes(job: Job) -> None:
    spec = job.spec.model_copy(update={"codec": job.spec.codec.model_copy(
        update={"format": RawFormat(dtype="uint8", scale=0.5), "max_record_bytes": 64})})
    module = build_model("mlp", in_shape=(DIM,), num_classes=CLASSES, hidden=[16]).eval()
    loaded = LoadedModel(module=module, checkpoint="c", step=0, examples=0, parameters=0)
    raw = np.arange(2 * DIM, dtype=np.uint8).reshape(2, DIM)
    predictions = predict(loaded, spec, [base64.b64encode(r.tobytes()).decode() for r in raw])
    with torch.inference_mode():
        expected = torch.softmax(module(torch.from_numpy(raw.astype(np.float32) * 0.5)), dim=1)
    torch.testing.assert_close(torch.tensor([p.probabilities for p in predictions]), expected)
    for bad, reason in [("not base64!", "not valid base64"), (base64.b64encode(b"\x01\x02").decode(),
                                                              "raw value has 2 bytes, expected 8"),
                        ([1, 2], "base64 string"), ("A" * 200, "exceeds max_record_bytes=64")]:
        with pytest.raises(InvalidInput, match=reason) as caught:
            predict(loaded, spec, [base64.b64encode(raw[0].tobytes()).decode(), bad])
        assert caught.value.field == "inputs[1]"


# --- S3 ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"{host}:{port}"
    server.stop()


def test_checkpoints_on_s3_are_listed_archived_and_loaded(job: Job, s3_endpoint: str, cache: ModelCache) -> None:
    from pyarrow.fs import FileSystem, LocalFileSystem, copy_files

    bucket, prefix = f"art-{uuid.uuid4().hex[:8]}", "runs"
    # Endpoint and credentials in the URI (no AWS environment): every location handed out must keep
    # them to reach the files again, and show neither.
    storage = f"s3://key:secret@{bucket}/{prefix}?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    fs, _ = FileSystem.from_uri(storage + "&allow_bucket_creation=true")
    fs.create_dir(bucket)
    copy_files(job.storage, f"{bucket}/{prefix}", source_filesystem=LocalFileSystem(), destination_filesystem=fs)

    assert list_checkpoints(storage, job.spec.job_id) == list_checkpoints(job.storage, job.spec.job_id)
    local = checkpoint_detail(job.storage, job.spec.job_id, "latest")
    assert checkpoint_detail(storage, job.spec.job_id, "latest") == local  # Ray's registry, read from the bucket
    location = resolve_checkpoint(storage, job.spec.job_id, local.id)
    assert location.startswith(f"s3://key:secret@{bucket}/{prefix}/{job.spec.job_id}/{local.id}?endpoint_override=")
    assert display_location(location) == f"s3://{bucket}/{prefix}/{job.spec.job_id}/{local.id}"
    chunks = list(archive_stream(location, chunk_size=4096))
    local_location = resolve_checkpoint(job.storage, job.spec.job_id, local.id)
    assert len(chunks) > 1 and _unpack(chunks) == _unpack(list(archive_stream(local_location)))

    loaded = ModelCache().load(job.spec, location)
    assert loaded.checkpoint == display_location(location) and loaded.step == local.step
    from_disk = cache.load(job.spec, local_location)
    for key, tensor in loaded.module.state_dict().items():
        torch.testing.assert_close(tensor, from_disk.module.state_dict()[key], rtol=0, atol=0)

    purge_checkpoints(storage, job.spec.job_id)
    assert list_checkpoints(storage, job.spec.job_id) == []


def test_unreachable_storage_is_503(job: Job) -> None:
    storage = "s3://key:secret@bucket/p?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"
    with pytest.raises(ServiceError) as caught:
        list_checkpoints(storage, job.spec.job_id)
    assert (caught.value.status_code, caught.value.code) == (503, "checkpoint_storage_unavailable")
    assert "secret" not in str(caught.value)
