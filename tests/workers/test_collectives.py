"""Every tensor the train loop hands to a collective is on the training device, as NCCL requires.

Without a GPU, the training device is torch's lazy device (a real non-CPU device of CPU builds)
and the process group a stand-in that, like NCCL, refuses CPU tensors. The whole loop runs
against it: decisions, idle and stall reports, evaluation, BatchNorm merging, dead letters and
checkpoints. The same loop with its collectives on the CPU (what the loop did before) fails.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from cicw import CICWLoss
from workers.kafka.codecs import decode_batch
from workers.kafka.dead_letters import DeadLetterSink
from workers.kafka.prefetch import ReadyBatch
from workers.kafka.records import KafkaRecord
from workers.report import JobReport
from workers.spec import JobSpec
from workers.train.collectives import Collectives
from workers.train.control import StopWatch
from workers.train.loop import EvalSet, JobWorker, Reporter
from workers.train.partitions import PartitionWatch, refresh_partitions
from workers.train.randomness import WorkerRandomness
from workers.train.step import Learner, build_optimizer

TOPIC = "t"


@pytest.fixture(scope="module")
def lazy() -> torch.device:
    import torch._lazy.ts_backend

    torch._lazy.ts_backend.init()
    return torch.device("lazy", 0)


class NcclLikeGroup:
    """Stands in for torch.distributed with NCCL, as one rank of two whose peer adds zeros (so
    sums and maxima are this rank's own): refuses tensors on the CPU, as NCCL does, and records
    the device of every tensor it is handed."""

    class ReduceOp:
        SUM, MAX = "sum", "max"

    def __init__(self) -> None:
        self.devices: list[torch.device] = []
        self.gathered: list[Any] = []

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        self.devices.append(tensor.device)
        if tensor.device.type == "cpu":
            raise RuntimeError("No backend type associated with device type cpu")

    def all_gather_object(self, out: list[Any], obj: Any) -> None:
        # NCCL pickles the object into a tensor on the current GPU itself: any object goes.
        self.gathered.append(obj)
        out[:] = [copy.deepcopy(obj) for _ in out]


def _spec() -> JobSpec:
    return JobSpec.model_validate({
        "job_id": "lazy", "source": {"bootstrap_servers": "unused:1", "topic": TOPIC, "stop_at": "end"},
        "codec": {"format": {"kind": "json"}, "input_shape": [4], "num_classes": 3},
        "cicw": {"method": "cicw", "burn_in_steps": 1, "anneal_steps": 1},
        "checkpoint": {"every_steps": 2, "every_s": None}, "report_every_steps": 1,
        "evaluation": {"path": "unused.npz", "every_steps": 3}})


def _records(partition: int, start: int, n: int, *, garbage: int = 0) -> list[KafkaRecord]:
    g = torch.Generator().manual_seed(start)
    out = [KafkaRecord(TOPIC, partition, start + i, json.dumps(
        {"x": torch.randn(4, generator=g).tolist(), "y": i % 3}).encode()) for i in range(n)]
    return out + [KafkaRecord(TOPIC, partition, start + n + i, b"not json") for i in range(garbage)]


class FakeBatches:
    """Decoded batches as DecodedBatches hands them out: partition 1 (rank 1 of 2), then done."""

    def __init__(self, spec: JobSpec) -> None:
        self.positions: dict[int, int] = {1: 0}
        chunks = [_records(1, 0, 6, garbage=1), [], _records(1, 7, 5), _records(1, 12, 6), _records(1, 18, 4)]
        self._ready: Iterator[ReadyBatch] = iter(
            [ReadyBatch(c, decode_batch(c, spec.codec), {1: c[-1].offset + 1 if c else 7}) for c in chunks])

    def next(self) -> ReadyBatch | None:
        ready = next(self._ready, None)
        if ready is not None:
            self.positions = ready.positions
        return ready

    def close(self) -> None:
        pass


class FakeSource:
    trouble = "watermarks: timed out"
    partition_count = 2
    offset_resets: tuple[Any, ...] = ()

    def topic_partition_count(self) -> int | None:
        return 2

    def add_partitions(self, count: int) -> list[int]:
        return []

    def stalled_for(self) -> float:
        return 2.0  # stalled, not past the deadline: idle reports carry the stall

    def lag_by_partition(self) -> dict[int, int]:
        return {1: 3}

    def close(self) -> None:
        pass


class DeliveringProducer:
    def __init__(self) -> None:
        self.letters: list[dict[str, bytes]] = []
        self._pending: list[Any] = []

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                headers: list[tuple[str, bytes]] | None = None, on_delivery: Any = None) -> None:
        self.letters.append(dict(headers or []))
        self._pending.append(on_delivery)

    def poll(self, timeout: float = 0) -> int:
        return self.flush(timeout)

    def flush(self, timeout: float = 0) -> int:
        for callback in self._pending:
            callback(None, None)
        self._pending = []
        return 0


class RecordingReporter(Reporter):
    """Reporter without Ray: keeps what Ray Train would be handed."""

    def __init__(self) -> None:
        super().__init__(channel=None, rank=1)
        object.__setattr__(self, "persisted", [])

    def persist(self, report: JobReport, directory: str | None) -> None:
        self.persisted.append((report, directory))  # type: ignore[attr-defined]


def _worker(spec: JobSpec, collectives: Collectives, device: torch.device) -> JobWorker:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).to(device)
    optimizer, scheduler = build_optimizer(spec.optimizer, model.parameters())
    loss_fn = CICWLoss(spec.cicw, num_classes=3, generator=torch.Generator().manual_seed(0))
    learner = Learner(model, optimizer, scheduler, loss_fn, device, world_size=2)
    eval_set = EvalSet(spec.evaluation, torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))  # type: ignore[arg-type]
    return JobWorker(spec, rank=1, collectives=collectives, learner=learner,
                     randomness=WorkerRandomness.seeded(0, 1, torch.device("cpu")), state=None,
                     source=FakeSource(), batches=FakeBatches(spec),  # type: ignore[arg-type]
                     dead_letters=DeadLetterSink(DeliveringProducer()), committer=None,
                     reporter=RecordingReporter(), stop_watch=StopWatch(None), eval_set=eval_set, record_log=None)


def test_the_loop_hands_collectives_only_tensors_on_the_training_device(lazy: torch.device) -> None:
    spec, group = _spec(), NcclLikeGroup()
    worker = _worker(spec, Collectives(lazy, distributed=True, world_size=2, backend=group), lazy)
    worker.run()

    assert group.devices and set(group.devices) == {lazy}
    persisted = worker.reporter.persisted  # type: ignore[attr-defined]
    # checkpoints at steps 2 and 4 and the last one (the stream ended after 4 steps)
    assert [r.checkpoint_step for r, _ in persisted] == [2, 4, 4] and persisted[-1][0].final
    assert persisted[0][0].offsets == {1: 12} and persisted[-1][0].offsets == {1: 22}  # 7 + 5 + 1 garbage
    assert persisted[-1][0].eval_examples == 5 and persisted[-1][0].rejected == 1
    assert persisted[-1][0].lag_per_partition == {1: 3} and persisted[-1][0].lag == 3
    assert worker.counters.examples == 21 and worker.counters.step == 4
    assert len(worker.dead_letters._producer.letters) == 1  # type: ignore[attr-defined]


def test_the_same_loop_with_its_collectives_on_the_cpu_is_refused(lazy: torch.device) -> None:
    # What the loop did before: CPU tensors whatever the training device. NCCL refuses them.
    spec, group = _spec(), NcclLikeGroup()
    worker = _worker(spec, Collectives(torch.device("cpu"), distributed=True, world_size=2, backend=group), lazy)
    with pytest.raises(RuntimeError, match="device type cpu"):
        worker.run()
    assert group.devices == [torch.device("cpu")]  # the very first decision


class GrowingTopic:
    def __init__(self, seen: int | None) -> None:
        self.seen = seen
        self.added_up_to: int | None = None

    def topic_partition_count(self) -> int | None:
        return self.seen

    def add_partitions(self, count: int) -> list[int]:
        self.added_up_to = count
        return [p for p in range(count) if p % 2 == 1 and p >= 4]


def test_partitions_added_to_the_topic_are_agreed_on_the_training_device(lazy: torch.device) -> None:
    group = NcclLikeGroup()
    collectives = Collectives(lazy, distributed=True, world_size=2, backend=group)
    grown, same, unknown = GrowingTopic(6), GrowingTopic(4), GrowingTopic(None)
    assert refresh_partitions(grown, collectives, known=4) == 6 and grown.added_up_to == 6
    assert refresh_partitions(same, collectives, known=4) == 4 and same.added_up_to is None
    assert refresh_partitions(unknown, collectives, known=4) == 4 and unknown.added_up_to is None
    assert set(group.devices) == {lazy}


def test_the_broker_is_asked_for_new_partitions_only_once_the_refresh_interval_passed() -> None:
    now = [0.0]
    topic = GrowingTopic(6)
    watch = PartitionWatch(topic, every_s=60.0, known=4, clock=lambda: now[0])
    single = Collectives(torch.device("cpu"), distributed=False, world_size=1)
    now[0] = 59.0
    assert watch.at_checkpoint(single) == 4 and topic.added_up_to is None  # not due: no metadata asked
    now[0] = 60.0
    assert watch.at_checkpoint(single) == 6 and topic.added_up_to == 6
    topic.seen, now[0] = 8, 100.0
    assert watch.at_checkpoint(single) == 6  # the next look is due 60 s after the last one
    now[0] = 120.0
    assert watch.at_checkpoint(single) == 8
