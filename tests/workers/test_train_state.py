"""Checkpoints: what TrainState holds, its invariants on load, loading without code execution, and
CheckpointMeta (meta.json) deciding whether a spec may resume from a checkpoint."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from cicw import CICWConfig, CICWLoss
from workers.errors import CheckpointError
from workers.spec import JobSpec, OptimizerSpec
from workers.train.checkpoint_meta import CheckpointMeta, data_hash, read_meta
from workers.train.checkpoints import STATE_FILE, load_state, save_state
from workers.train.metrics import NoiseTotals
from workers.train.randomness import WorkerRandomness
from workers.train.state import Counters, TrainState
from workers.train.step import Learner, build_optimizer


def _spec(**overrides: Any) -> JobSpec:
    doc: dict[str, Any] = {"job_id": "job-a", "source": {"bootstrap_servers": "b:9092", "topic": "t"},
                           "codec": {"format": {"kind": "json"}, "input_shape": [4], "num_classes": 3}}
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        doc[section] = {**doc[section], name: value} if name else value
    return JobSpec.model_validate(doc)


def _state(spec: JobSpec, *, world: int = 2) -> TrainState:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    optimizer, scheduler = build_optimizer(OptimizerSpec(lr_milestones=[3]), model.parameters())
    loss_fn = CICWLoss(CICWConfig(gate="steps", burn_in_steps=1), num_classes=3,
                       generator=torch.Generator().manual_seed(0))
    learner = Learner(model, optimizer, scheduler, loss_fn, torch.device("cpu"))
    learner.step(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
    counters = Counters(step=1, examples=6, rejected=2, noise=NoiseTotals(down=3, corrupted=2, hit=1))
    offsets = {0: 4, 2: 5}
    meta = CheckpointMeta.for_spec(spec, partition_count=3, step=1, examples=6, offsets=offsets)
    rng = [WorkerRandomness.seeded(0, r, torch.device("cpu")).state() for r in range(world)]
    return TrainState(meta=meta, **learner.state_dicts(), counters=counters, rng=rng)


def _rewrite(directory: Path, change: Any) -> None:
    """Edit state.pt's payload in place, as a corrupted or forged checkpoint would be."""
    payload = torch.load(directory / STATE_FILE, weights_only=True)
    change(payload)
    torch.save(payload, directory / STATE_FILE)


def test_a_checkpoint_round_trips_and_its_meta_reads_without_torch(tmp_path: Path) -> None:
    spec = _spec()
    state = _state(spec)
    save_state(tmp_path, state)
    back = load_state(tmp_path)
    assert back.meta == state.meta == read_meta(tmp_path)
    assert back.offsets == {0: 4, 2: 5} and back.counters == state.counters
    assert back.model.keys() == state.model.keys()
    assert all(torch.equal(back.model[k], v) for k, v in state.model.items())
    assert back.scheduler["milestones"] == {3: 1} and back.loss == state.loss
    assert torch.equal(back.rng[1]["mixup"], state.rng[1]["mixup"])
    assert back.rng_for(1, 2) is back.rng[1] and back.rng_for(0, 3) is None  # another world size: fresh streams
    back.meta.check_resumable(spec)

    # The service and the runner's preflight read meta.json without torch.
    code = (f"import sys; from workers.train.checkpoint_meta import read_meta; m = read_meta({str(tmp_path)!r}); "
            "print(m.job_id, m.topic, m.partition_count, m.step, dict(m.offsets), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert out.stdout.split() == ["job-a", "t", "3", "1", "{0:", "4,", "2:", "5}", "False"]


class _Payload:
    """An object whose unpickling runs code: what a forged state.pt could hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the plain pickle below
def test_loading_never_runs_code_from_the_checkpoint(tmp_path: Path) -> None:
    save_state(tmp_path, _state(_spec()))
    marker = tmp_path / "pwned"
    _rewrite(tmp_path, lambda p: p.update(meta={**p["meta"]}, loss={"evil": _Payload(marker)}))
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_state(tmp_path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        (tmp_path / STATE_FILE).write_bytes(pickle.dumps({"version": 2}) + b"truncated")
        load_state(tmp_path)


@pytest.mark.parametrize(("change", "message"), [
    (lambda p: p.update(version=1), "format version 1 is not 2"),
    (lambda p: p.pop("rng"), r"lacks \['rng'\]"),
    (lambda p: p["counters"].update(step=2), r"counters \(step 2, examples 6\) disagree with its meta \(step 1"),
    (lambda p: p["counters"].update(rejected=-1), r"counters \['rejected'\] are not non-negative"),
    (lambda p: p["counters"].update(noise_hit=4), "noise_hit 4 exceeds"),
    (lambda p: p["counters"].pop("noise_hit"), "checkpoint counters must be"),
    (lambda p: p["meta"]["offsets"].update({"1": -3}), "greater than or equal to 0"),
    (lambda p: p["meta"]["offsets"].update({"7": 1}), r"partitions \[7\] outside the topic's 3"),
    (lambda p: p["rng"][1].pop("mixup"), r"rng of rank 1 lacks \['mixup'\]"),
    (lambda p: p["rng"][0].update(mixup=torch.zeros(3)), r"rng of rank 0: \['mixup'\] are not generator states"),
    (lambda p: p.update(model=[1, 2]), "model is list, not a state dict"),
], ids=["version", "missing", "counters-vs-meta", "negative", "noise", "counter-keys", "negative-offset",
        "partition", "rng-stream", "rng-type", "model"])
def test_broken_invariants_are_refused_naming_them(tmp_path: Path, change: Any, message: str) -> None:
    save_state(tmp_path, _state(_spec()))
    _rewrite(tmp_path, change)
    with pytest.raises(CheckpointError, match=message):
        load_state(tmp_path)


def test_a_checkpoint_resumes_only_the_same_job_on_the_same_data(tmp_path: Path) -> None:
    spec = _spec()
    save_state(tmp_path, _state(spec))
    meta = read_meta(tmp_path)
    # Other workers, batch size, and codec settings that do not change what a record means resume.
    meta.check_resumable(_spec(scaling={"num_workers": 5}, source__batch_size=7, codec__max_record_bytes=10,
                               codec__clean_label_header="truth"))
    with pytest.raises(CheckpointError, match="belongs to job 'job-a', not 'job-b'"):
        meta.check_resumable(_spec(job_id="job-b"))
    with pytest.raises(CheckpointError, match="trained on topic 't'; the spec names 'other'"):
        meta.check_resumable(_spec(source__topic="other"))
    with pytest.raises(CheckpointError, match=r"input_shape: \[4\] -> \[2, 2\]"):
        meta.check_resumable(_spec(codec__input_shape=[2, 2]))
    with pytest.raises(CheckpointError, match=r"format: \{'kind': 'json'\} -> \{'kind': 'raw'\}"):
        meta.check_resumable(_spec(codec__format={"kind": "raw"}))


def test_the_data_hash_tells_formats_apart_and_ignores_spelled_out_defaults() -> None:
    hashes = {data_hash(_spec(codec__format={"kind": k})) for k in ("json", "raw", "image")}
    assert len(hashes) == 3
    assert data_hash(_spec()) == data_hash(_spec(codec__num_classes=3, codec__format={"kind": "json"},
                                                 codec__label_header="label"))
    assert data_hash(_spec(codec__num_classes=4)) != data_hash(_spec())


def test_meta_json_names_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"cannot read meta\.json"):
        read_meta(tmp_path)
    save_state(tmp_path, _state(_spec()))
    doc = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**doc, "format_version": 1}))
    with pytest.raises(CheckpointError, match="format version 1 is not 2"):
        read_meta(tmp_path)
