"""Checkpoints on S3: a job whose checkpoint.storage_path is an s3:// URI writes its checkpoints
to the bucket through Ray Train and resumes from them, exactly once, with nothing else changed.

The object store is moto's S3 server (the S3 REST protocol over HTTP on loopback, objects in
memory). Credentials and endpoint come from the standard AWS environment variables, as they
would for AWS itself or MinIO; they are set before this module's Ray starts, so its workers
inherit them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers.kafka.broker import EmbeddedBroker
from workers.kafka.topics import ensure_topic
from workers.runner import latest_checkpoint, run_job
from workers.train.checkpoints import STATE_FILE, load_state

from .test_job_control import _records, _send, _spec
from .test_train_job import _lineage

pytestmark = pytest.mark.slow
BUCKET = "cicw-checkpoints"


@pytest.fixture(scope="module")
def s3_and_ray() -> Iterator[None]:
    import ray
    from moto.server import ThreadedMotoServer
    from pyarrow.fs import FileSystem

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs, _ = FileSystem.from_uri(f"s3://{BUCKET}?allow_bucket_creation=true")
    fs.create_dir(BUCKET)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _checkpoints_in_bucket(prefix: str) -> list[str]:
    from pyarrow.fs import FileSelector, FileSystem

    fs, path = FileSystem.from_uri(f"s3://{BUCKET}/{prefix}")
    return sorted(info.path for info in fs.get_file_info(FileSelector(path, recursive=True))
                  if info.base_name == STATE_FILE)


def test_checkpoints_go_to_s3_and_a_rerun_resumes_from_them(kafka_broker: EmbeddedBroker, s3_and_ray: None,
                                                             tmp_path: Path) -> None:
    topic = f"s3-{uuid.uuid4().hex[:8]}"
    ensure_topic(kafka_broker.bootstrap, topic, 2)
    _send(kafka_broker.bootstrap, topic, 400, partitions=[0, 1])
    prefix = f"runs-{uuid.uuid4().hex[:6]}"
    spec = _spec(kafka_broker.bootstrap, topic, tmp_path, source__stop_at="end",
                 checkpoint={"every_steps": 5, "keep": 2, "storage_path": f"s3://{BUCKET}/{prefix}"})

    first = run_job(spec)
    assert first.state == "finished", first.error
    assert first.checkpoint is not None and first.checkpoint.startswith(f"s3://{BUCKET}/{prefix}/")
    assert load_state(first.checkpoint).offsets == {0: 200, 1: 200}
    assert not (tmp_path / "ckpt").exists() and not Path(prefix).exists()  # nothing written locally
    # What a failed job's summary would name: the checkpoint the bucket's run registry holds.
    durable = latest_checkpoint(spec.checkpoint.storage_path, spec.job_id)
    assert durable is not None and (durable.location, durable.step) == (first.checkpoint, first.checkpoint_step)

    # More records arrive; the same job again resumes from the bucket's checkpoint.
    _send(kafka_broker.bootstrap, topic, 200, partitions=[0, 1], start=400, seed=1)
    second = run_job(spec)
    assert second.state == "finished", second.error
    assert second.report is not None and second.report.examples == 600
    assert load_state(second.checkpoint).offsets == {0: 300, 1: 300}
    lineage = _lineage(tmp_path / "records")
    assert len(lineage) == len(set(lineage))
    assert sorted(lineage) == _records({0: 300, 1: 300})  # every record once over both runs
    kept = _checkpoints_in_bucket(prefix)
    assert len(kept) == 2 and second.checkpoint.removeprefix("s3://") + "/" + STATE_FILE in kept  # keep: 2
