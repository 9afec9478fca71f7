"""Training throughput streaming from Kafka against the same model fed from in-memory tensors,
and produce-to-optimizer-step latency under a rate-limited producer.

(1) Throughput, one process, world size 1. "kafka": KafkaSource (stop_at="end") -> DecodedBatches
    (the train loop's feed: a thread runs decode_batch on the next batch while a step runs) -> one
    CICWLoss step (forward, backward, optimizer step) per batch; "memory": the same model,
    optimizer and CICWLoss fed batches of the same size from tensors already in memory (made by
    decode_batch from the same records, so both feeds train on the same values). A fresh model
    per run, runs interleaved (order alternating), medians over repeats; the ratio is the median
    of the paired kafka/memory ratios. The kafka clock runs from KafkaSource.start() to the
    optimizer step that consumed the last record. Both feeds train on --records rounded down to
    whole batches; the topic holds two batches more, so the stream's last batch is not cut by
    max_wait_s at the end of the data (a bounded-topic artifact a continuous job never meets).
(2) Latency: a producer process writes records at a fixed rate, each with its produce time
    (time.time_ns) in a header, while this process trains on them (MLP, one CICW step per
    batch). Latency of a record = time the optimizer step that consumed it finished minus its
    produce time. Records produced in the first --warmup-s seconds are not counted. When the
    trainer cannot keep up, the backlog and so the latency grow without bound: that is reported
    (consumed rate < produced rate, records left unconsumed), and the run is repeated at a rate
    it can sustain. Run for several consumer settings (--latency-configs): SourceSpec.fetch_records
    (the poller's consume() waits up to 0.1 s to fill that many) and the client's
    fetch.wait.max.ms (how long a broker may hold a fetch; the embedded broker holds it that long
    even when records arrive; librdkafka's 500 ms set the latency until the library's default
    became 100 ms, workers.kafka.clients.CONFLUENT_DEFAULTS).

Records are what `cicw-stream produce` writes for Fashion-MNIST: 784 raw uint8 bytes, labels in
the "label" and "clean_label" headers (real Fashion-MNIST when the Debian package is installed,
else random pixels), decoded with the example job's codec (uint8, scale 1/255). preact_resnet18
gets random CIFAR-shaped [3, 32, 32] uint8 records. The embedded broker (Tansu) is started here
and runs on the same machine, competing for its cores.

CPU use is reported per run (main thread, this process's other threads, the broker, the
producer, and "foreign": every other process), because the development machine is a shared
2-core VM: a run with foreign load is a contended run.

CICW: CICWConfig() defaults (CICW-M, weighted mixup, KL class reweighting, validate_args on)
with burn_in_steps=0, so every step does the full weighting work (the default config starts
with 4,000 plain-mixup steps). Optimizer: SGD lr 0.05, momentum 0.9 Nesterov, weight decay
5e-4, as the example job. Nothing is asserted: targets are printed as PASS/FAIL lines.

    python bench/stream_train.py                        # MLP on the CPU, threads 1 and 2, 10k rec/s
    python bench/stream_train.py --records 30000 --repeats 5 --threads 1
    python bench/stream_train.py --repeats 0 --rate 7000 --latency-configs 128:50,1024:100   # latency only
    python bench/stream_train.py --model preact_resnet18 --device cuda --records 20000 --rate 0
    python bench/stream_train.py --model preact_resnet18 --records 512 --repeats 1 --rate 0   # CPU smoke run

Targets (issue 3): kafka >= 0.9 x memory throughput for the MLP on the CPU and for
preact_resnet18 on a GPU; latency p50 < 250 ms at 10k records/s.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from confluent_kafka import Producer
from machine_info import cpu_name  # bench/ is on sys.path when a bench script runs

from cicw import CICWConfig, CICWLoss
from workers.data.datasets import FASHION_MNIST_DIR, load_fashion_mnist
from workers.kafka.broker import EmbeddedBroker
from workers.kafka.codecs import decode_batch
from workers.kafka.prefetch import DecodedBatches, ReadyBatch
from workers.kafka.producing import produce_waiting
from workers.kafka.records import CodecSpec, KafkaRecord, RawFormat, RecordChunk
from workers.kafka.source import KafkaSource, SourceSpec
from workers.kafka.topics import ensure_topic
from workers.spec import OptimizerSpec
from workers.train.models import build_model
from workers.train.step import Learner, build_optimizer

PARTITIONS = 4
NUM_CLASSES = 10
TIME_HEADER = "produced_ns"
THROUGHPUT_TARGET = 0.9
LATENCY_P50_TARGET_MS = 250.0
TARGET_RATE = 10_000.0
PRODUCER_LINGER_MS = 5
# Batches' worth of records in the throughput topic beyond those trained on.
SLACK_BATCHES = 2
# Foreign load (cores busy in processes that are not part of the run) from which a run counts
# as contended.
CONTENDED_CORES = 0.25
# A run "keeps up" when it consumed at least this share of the produced rate over the window
# and nothing produced in the window was left unconsumed at the end.
KEEP_UP_SHARE = 0.97


# ---------------------------------------------------------------------------------------------
# data and topics


@dataclass(frozen=True)
class Workload:
    """Records as the producer writes them: pixels [N, C, H, W] uint8 and labels [N]."""

    pixels: np.ndarray
    labels: np.ndarray
    codec: CodecSpec
    source: str


def load_workload(model: str, n: int, data: str) -> Workload:
    if model == "mlp" and data == "auto" and FASHION_MNIST_DIR.exists():
        d = load_fashion_mnist(FASHION_MNIST_DIR, split="train")
        idx = np.arange(n) % len(d)  # cycles past 60k
        pixels, labels, origin = d.images.numpy()[idx], d.labels.numpy()[idx], "Fashion-MNIST train"
    else:
        shape = (1, 28, 28) if model == "mlp" else (3, 32, 32)
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        labels, origin = rng.integers(0, NUM_CLASSES, n), f"random uint8 {list(shape)}"
    # Pixels scaled to [0, 1] in the codec, as in examples/fashion_mnist_job.yaml.
    codec = CodecSpec(format=RawFormat(dtype="uint8", scale=1 / 255), input_shape=pixels.shape[1:],
                      num_classes=NUM_CLASSES)
    return Workload(np.ascontiguousarray(pixels), labels.astype(np.int64), codec, origin)


def record_headers(label: int) -> list[tuple[str, bytes]]:
    # Noise-free labels: the step's cost does not depend on which labels are wrong.
    text = str(label).encode()
    return [("label", text), ("clean_label", text)]


def decoded_in_memory(workload: Workload) -> tuple[torch.Tensor, torch.Tensor]:
    """The tensors decode_batch makes of the workload's records: the in-memory feed trains on
    exactly what the stream yields."""
    records = [KafkaRecord("in-memory", 0, i, x.tobytes(), headers=tuple(record_headers(int(y))))
               for i, (x, y) in enumerate(zip(workload.pixels, workload.labels, strict=True))]
    batch = decode_batch(records, workload.codec)
    if batch.rejected:
        raise RuntimeError(f"rejected: {batch.rejected[0].reason}")
    return batch.inputs, batch.targets


def fill_topic(bootstrap: str, workload: Workload, tag: str) -> str:
    topic = f"stream-train-{tag}-{uuid.uuid4().hex[:6]}"
    ensure_topic(bootstrap, topic, PARTITIONS)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for i, (x, y) in enumerate(zip(workload.pixels, workload.labels, strict=True)):
        produce_waiting(producer, topic, value=x.tobytes(), headers=record_headers(int(y)), partition=i % PARTITIONS)
    if producer.flush(60):
        raise RuntimeError(f"records not delivered to {topic}")
    return topic


# ---------------------------------------------------------------------------------------------
# the training step, shared by both feeds


def make_trainer(model_name: str, codec: CodecSpec, device: torch.device) -> Learner:
    """The job's own step (workers.train.step.Learner): the job spec's default optimizer (SGD,
    lr 0.05, Nesterov momentum 0.9, weight decay 5e-4, constant LR), CICW defaults without burn-in."""
    torch.manual_seed(0)
    model = build_model(model_name, in_shape=codec.input_shape, num_classes=codec.num_classes).to(device)
    optimizer, scheduler = build_optimizer(OptimizerSpec(), model.parameters())
    loss_fn = CICWLoss(CICWConfig(gate="steps", burn_in_steps=0), num_classes=codec.num_classes,
                       generator=torch.Generator(device=device).manual_seed(1234))
    return Learner(model, optimizer, scheduler, loss_fn, device)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timings end when the step did)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# CPU accounting: who used the cores during a run


@dataclass(frozen=True)
class CpuSnapshot:
    wall: float
    main: float  # this (main) thread's CPU seconds
    process: float  # the whole process, threads that already exited included
    helpers: tuple[float, ...]  # CPU seconds of each helper process (broker, producer)
    machine_busy: float | None  # busy CPU seconds of the machine, every process


def _machine_busy_s() -> float | None:
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    # user nice system idle iowait irq softirq: steal (other VMs) and guest (counted in user) left out
    return (sum(fields[:7]) - idle) / os.sysconf("SC_CLK_TCK")


def _pid_cpu_s(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def broker_pid(port: int) -> int | None:
    """The embedded broker's process, found by its listener address (Linux /proc)."""
    needle = f"tcp://127.0.0.1:{port}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "cmdline").read_bytes():
                    return int(entry.name)
            except OSError:
                continue
    return None


@dataclass
class Meter:
    """Takes CPU snapshots of this process, the helper processes and the whole machine."""

    helper_pids: list[int] = field(default_factory=list)

    def snapshot(self) -> CpuSnapshot:
        t = os.times()
        return CpuSnapshot(time.perf_counter(), time.thread_time(), t.user + t.system,
                           tuple(_pid_cpu_s(pid) for pid in self.helper_pids), _machine_busy_s())


@dataclass(frozen=True)
class CpuUse:
    """Cores busy on average: this process's main thread and its other threads (poller,
    librdkafka, torch workers), the broker (and producer), and "foreign": every other process
    on the machine (this is a shared development VM)."""

    main: float
    other_threads: float
    helpers: tuple[float, ...]  # in Meter.helper_pids order
    foreign: float | None

    @property
    def process(self) -> float:
        return self.main + self.other_threads

    def helper(self, i: int) -> float | None:
        return self.helpers[i] if i < len(self.helpers) else None

    @staticmethod
    def between(a: CpuSnapshot, b: CpuSnapshot) -> CpuUse:
        wall = max(b.wall - a.wall, 1e-9)
        main, proc = (b.main - a.main) / wall, (b.process - a.process) / wall
        helpers = tuple((hb - ha) / wall for ha, hb in zip(a.helpers, b.helpers, strict=True))
        foreign = (None if a.machine_busy is None or b.machine_busy is None
                   else max((b.machine_busy - a.machine_busy) / wall - proc - sum(helpers), 0.0))
        return CpuUse(main, max(proc - main, 0.0), helpers, foreign)


# ---------------------------------------------------------------------------------------------
# (1) throughput


@dataclass
class RunResult:
    records: int
    seconds: float
    steps: int
    cpu: CpuUse
    start_s: float = 0.0  # KafkaSource.start() until the first batch
    wait_s: float = 0.0  # main thread waiting for the next decoded batch
    train_s: float = 0.0  # main thread in the training step

    @property
    def rate(self) -> float:
        return self.records / self.seconds

    @property
    def stall_s(self) -> float:
        """Main thread neither on a core nor waiting for data: waiting for the GIL or a core."""
        return max(self.seconds * (1.0 - self.cpu.main) - self.wait_s, 0.0)


def run_memory(trainer: Learner, x: torch.Tensor, y: torch.Tensor, batch_size: int, meter: Meter) -> RunResult:
    sync(trainer.device)
    before = meter.snapshot()
    steps = 0
    for i in range(0, len(x), batch_size):
        trainer.step(x[i:i + batch_size], y[i:i + batch_size])
        steps += 1
    sync(trainer.device)
    after = meter.snapshot()
    seconds = after.wall - before.wall
    return RunResult(len(x), seconds, steps, CpuUse.between(before, after), train_s=seconds)


class InlineBatches:
    """--no-decode-ahead: next_batch and decode_batch on the training thread, as the train loop
    did before workers.kafka.prefetch (the same interface as DecodedBatches)."""

    def __init__(self, source: KafkaSource, codec: CodecSpec) -> None:
        self._source, self._codec = source, codec

    def next(self) -> ReadyBatch | None:
        records = self._source.next_batch()
        return None if records is None else ReadyBatch(records, decode_batch(records, self._codec), {})

    def close(self) -> None:
        pass


def run_kafka(trainer: Learner, spec: SourceSpec, codec: CodecSpec, n: int, meter: Meter,
              decode_ahead: bool = True) -> RunResult:
    """The train loop's feed: DecodedBatches fetches and decodes the next batch in a thread while
    the current step runs (wait_s is what the step waited for it); or, without decode_ahead,
    both on this thread (wait_s then includes the decoding)."""
    source = KafkaSource(spec, group_id=f"bench-{uuid.uuid4().hex[:6]}")
    before = meter.snapshot()
    got = steps = 0
    first = wait = train = 0.0
    source.start()
    batches = DecodedBatches(source, codec) if decode_ahead else InlineBatches(source, codec)
    try:
        while got < n:
            t0 = time.perf_counter()
            ready = batches.next()
            t1 = time.perf_counter()
            if ready is None:
                raise RuntimeError(f"source ended after {got} of {n} records")
            wait += t1 - t0
            if not ready.records:
                continue
            first = first or t1 - before.wall
            if ready.decoded.rejected:
                raise RuntimeError(f"rejected: {ready.decoded.rejected[0].reason}")
            trainer.step(ready.decoded.inputs, ready.decoded.targets)
            train += time.perf_counter() - t1
            got += len(ready.records)
            steps += 1
        sync(trainer.device)
        after = meter.snapshot()  # before close(): the end-of-topic check is not part of training
    finally:
        batches.close()
        source.close()
    return RunResult(got, after.wall - before.wall, steps, CpuUse.between(before, after),
                     start_s=first, wait_s=wait, train_s=train)


@dataclass
class Pair:
    memory: list[RunResult] = field(default_factory=list)
    kafka: list[RunResult] = field(default_factory=list)

    def ratios(self) -> list[float]:
        return [k.rate / m.rate for k, m in zip(self.kafka, self.memory, strict=True)]

    def foreign(self) -> list[float]:
        """Per pair, the larger foreign load of its two runs (cores)."""
        return [max(k.cpu.foreign or 0.0, m.cpu.foreign or 0.0) for k, m in zip(self.kafka, self.memory, strict=True)]

    def uncontended(self) -> Pair:
        keep = [i for i, f in enumerate(self.foreign()) if f < CONTENDED_CORES]
        return Pair([self.memory[i] for i in keep], [self.kafka[i] for i in keep])


def trained_records(args: argparse.Namespace) -> int:
    """Whole batches only: the topic holds SLACK_BATCHES more, so the last batch fills at once
    instead of being cut by max_wait_s at the end of the data (which a continuous job never
    reaches), as bench/ingest.py keeps slack in its topic."""
    return max(args.records // args.batch_size, 1) * args.batch_size


def throughput(args: argparse.Namespace, bootstrap: str, topic: str, workload: Workload,
               threads: int, device: torch.device, meter: Meter) -> Pair:
    torch.set_num_threads(threads)
    n = trained_records(args)
    x, y = decoded_in_memory(workload)
    x, y = x[:n], y[:n]
    spec = SourceSpec(bootstrap_servers=bootstrap, topic=topic, stop_at="end", batch_size=args.batch_size,
                      max_wait_s=args.max_wait, fetch_records=args.fetch_records)
    warm = make_trainer(args.model, workload.codec, device)  # first-call costs out of the timings
    for i in range(3):
        warm.step(x[i * args.batch_size:(i + 1) * args.batch_size], y[i * args.batch_size:(i + 1) * args.batch_size])

    def memory() -> RunResult:
        return run_memory(make_trainer(args.model, workload.codec, device), x, y, args.batch_size, meter)

    def kafka() -> RunResult:
        return run_kafka(make_trainer(args.model, workload.codec, device), spec, workload.codec, n, meter,
                         decode_ahead=args.decode_ahead)

    pair = Pair()
    for r in range(args.repeats):
        # Alternating order, so drift in machine speed hits both feeds alike.
        runs: list[tuple[str, Callable[[], RunResult]]] = [("memory", memory), ("kafka", kafka)]
        for name, run in runs if r % 2 == 0 else runs[::-1]:
            getattr(pair, name).append(run())
    return pair


def _med(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{statistics.median(known):>6.2f}" if known else "   n/a"


def feed_line(threads: int, name: str, runs: list[RunResult]) -> str:
    def ms_per_step(seconds: Callable[[RunResult], float]) -> float:
        return statistics.median(seconds(r) / r.steps for r in runs) * 1e3

    return (f"{threads:>7} {name:>6} {statistics.median(r.rate for r in runs):>8.0f} "
            f"{statistics.median(r.steps for r in runs):>5.0f} {statistics.median(r.start_s for r in runs):>6.2f} "
            f"{ms_per_step(lambda r: r.wait_s):>6.2f} "
            f"{ms_per_step(lambda r: r.train_s):>6.2f} {ms_per_step(lambda r: r.stall_s):>6.2f} "
            f"{_med([r.cpu.main for r in runs])} {_med([r.cpu.other_threads for r in runs])} "
            f"{_med([r.cpu.helper(0) for r in runs])} {_med([r.cpu.foreign for r in runs])}")


def throughput_lines(pair: Pair, threads: int, model: str, device: torch.device) -> list[str]:
    # Another process taking a core skews a pair (this is a shared VM): such pairs are left out
    # of the medians when at least one pair ran uncontended; every pair is still printed.
    quiet = pair.uncontended()
    used = quiet if quiet.kafka else pair
    lines = [feed_line(threads, "memory", used.memory), feed_line(threads, "kafka", used.kafka)]
    ratio = statistics.median(used.ratios())
    basis = (f"median of {len(quiet.kafka)} uncontended pair(s) of {len(pair.kafka)}" if quiet.kafka
             else f"median of all {len(pair.kafka)} pairs, ALL CONTENDED")
    lines.append(f"{'':>7} kafka/memory {ratio:.3f} ({basis}); every pair's ratio (foreign cores): "
                 + ", ".join(f"{v:.3f} ({f:.2f})" for v, f in zip(pair.ratios(), pair.foreign(), strict=True)))
    lines.append(f"target {model} on {device.type}, {threads} torch thread(s): kafka >= {THROUGHPUT_TARGET} x "
                 f"memory throughput: {ratio:.3f} {'PASS' if ratio >= THROUGHPUT_TARGET else 'FAIL'}"
                 + ("" if quiet.kafka else " (contended)"))
    return lines


THROUGHPUT_HEADER = (f"{'threads':>7} {'feed':>6} {'rec/s':>8} {'steps':>5} {'start':>6} {'wait':>6} "
                     f"{'train':>6} {'stall':>6} {'main':>6} {'other':>6} {'broker':>6} {'foreign':>6}")
THROUGHPUT_LEGEND = ("start: s from KafkaSource.start() to the first batch; wait/train: main-thread ms per step "
                     "waiting for the next decoded batch (decode-ahead, workers.kafka.prefetch) / in the CICW step; "
                     "stall: ms per step the main thread was off-CPU while not waiting for data (waiting for the GIL "
                     "or a core); main/other/broker/foreign: cores busy on "
                     "average in the main thread / this process's other threads (poller, librdkafka, torch workers) "
                     "/ the broker / all other processes. Medians over uncontended pairs (foreign < "
                     f"{CONTENDED_CORES} cores) when there are any.")


# ---------------------------------------------------------------------------------------------
# (2) latency


@dataclass(frozen=True)
class Produced:
    """What the producer wrote: all records, those stamped before the window, the window's
    start and end (time.time_ns)."""

    records: int
    before_window: int
    window_start_ns: int
    end_ns: int


def paced_producer(bootstrap: str, topic: str, pixels: np.ndarray, labels: np.ndarray, rate: float,
                   seconds: float, warmup_s: float, ready: mp.synchronize.Event, done: mp.Queue[Produced]) -> None:
    """Child process: produce at ``rate`` records/s for ``seconds``; each record's produce time
    (time.time_ns) goes in a header. Reports a :class:`Produced` on ``done``."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": PRODUCER_LINGER_MS})
    values = [x.tobytes() for x in pixels]
    label_headers = [record_headers(int(y)) for y in labels]
    ready.set()
    sent = before_window = 0
    start, first_ns = time.perf_counter(), time.time_ns()
    window_ns = first_ns + int(warmup_s * 1e9)
    while (elapsed := time.perf_counter() - start) < seconds:
        # Bursts of whatever is due, then a short sleep: the pace holds to within ~1 ms.
        for _ in range(int(elapsed * rate) - sent):
            i, now = sent % len(values), time.time_ns()
            produce_waiting(producer, topic, value=values[i],
                            headers=[*label_headers[i], (TIME_HEADER, str(now).encode())], partition=sent % PARTITIONS)
            sent += 1
            before_window += now < window_ns
        producer.poll(0)
        time.sleep(0.0005)
    last_ns = time.time_ns()
    producer.flush(30)
    done.put(Produced(sent, before_window, window_ns, last_ns))


@dataclass(frozen=True)
class LatencyConfig:
    fetch_records: int  # SourceSpec.fetch_records: records asked for per client poll
    fetch_wait_ms: int | None  # consumer fetch.wait.max.ms; None: the library's default (CONFLUENT_DEFAULTS)

    @property
    def client_config(self) -> dict[str, str]:
        return {} if self.fetch_wait_ms is None else {"fetch.wait.max.ms": str(self.fetch_wait_ms)}

    def __str__(self) -> str:
        return f"{self.fetch_records}:{'default' if self.fetch_wait_ms is None else self.fetch_wait_ms}"


@dataclass
class LatencyResult:
    rate: float
    config: LatencyConfig
    produced_rate: float
    consumed_rate: float
    latencies_ms: np.ndarray  # records produced in the window; unconsumed ones as lower bounds
    unconsumed: int
    window_s: float
    p50_first_third: float
    p50_last_third: float
    cpu: CpuUse | None  # while producing; helpers: broker, producer

    @property
    def kept_up(self) -> bool:
        return self.unconsumed == 0 and self.consumed_rate >= KEEP_UP_SHARE * self.produced_rate


@contextmanager
def producer_process(bootstrap: str, topic: str, workload: Workload, rate: float,
                     seconds: float, warmup_s: float) -> Iterator[tuple[mp.Queue[Produced], int]]:
    # A process, not a thread: a producer thread here would take the trainer's GIL, which a
    # real producer (elsewhere) does not. "spawn": forking a process with live librdkafka and
    # OpenMP threads is unsafe.
    ctx = mp.get_context("spawn")
    ready, done = ctx.Event(), ctx.Queue()
    n = min(len(workload.pixels), 10_000)  # cycled: the values need not be distinct
    proc = ctx.Process(target=paced_producer, daemon=True,
                       args=(bootstrap, topic, workload.pixels[:n], workload.labels[:n], rate, seconds, warmup_s, ready,
                             done))
    proc.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("producer process did not start")
        yield done, int(proc.pid or 0)
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.terminate()


def latency_run(args: argparse.Namespace, bootstrap: str, workload: Workload, rate: float,
                config: LatencyConfig, device: torch.device, meter: Meter) -> LatencyResult:
    topic = f"stream-latency-{uuid.uuid4().hex[:6]}"
    ensure_topic(bootstrap, topic, PARTITIONS)
    trainer = make_trainer(args.model, workload.codec, device)
    spec = SourceSpec(bootstrap_servers=bootstrap, topic=topic, stop_at="never", batch_size=args.batch_size,
                      max_wait_s=args.max_wait, fetch_records=config.fetch_records,
                      client_config=config.client_config)
    produced_ns: list[np.ndarray] = []
    done_ns: list[int] = []
    total: Produced | None = None
    duration = args.warmup_s + args.seconds
    with KafkaSource(spec, group_id=f"bench-{uuid.uuid4().hex[:6]}") as source, \
            producer_process(bootstrap, topic, workload, rate, duration, args.warmup_s) as (report, producer_pid):
        meter = Meter([*meter.helper_pids, producer_pid])
        hard_stop = time.monotonic() + duration + args.drain_s
        consumed = 0
        cpu_start, cpu = meter.snapshot(), None
        batches = DecodedBatches(source, workload.codec)
        while (total is None or consumed < total.records) and time.monotonic() < hard_stop:
            ready = batches.next()
            records = ready.records if ready is not None else []
            if ready is not None and records:
                trainer.step(ready.decoded.inputs, ready.decoded.targets)
                sync(trainer.device)  # "finished" means finished on the device too
                done_ns.append(time.time_ns())
                produced_ns.append(produce_times_ns(records))
                consumed += len(records)
            if total is None and not report.empty():
                total, cpu = report.get(), CpuUse.between(cpu_start, meter.snapshot())
        if total is None:
            total = report.get(timeout=60)
        stopped_ns = time.time_ns()
        batches.close()
    return summarise_latency(rate, config, total, produced_ns, done_ns, stopped_ns, cpu)


def produce_times_ns(records: Sequence[KafkaRecord]) -> np.ndarray:
    # The header column of the chunk the source handed out: no KafkaRecord per record.
    chunk = RecordChunk.of_records(records)
    assert chunk is not None  # one topic
    return np.array([int(v) for v in chunk.header_values(TIME_HEADER, b"0")], dtype=np.int64)


def summarise_latency(rate: float, config: LatencyConfig, total: Produced, produced_ns: list[np.ndarray],
                      done_ns: list[int], stopped_ns: int, cpu: CpuUse | None) -> LatencyResult:
    lo, hi = total.window_start_ns, total.end_ns
    prod = np.concatenate(produced_ns) if produced_ns else np.zeros(0, np.int64)
    done = np.repeat(np.asarray(done_ns, np.int64), [len(p) for p in produced_ns])
    window_s = (hi - lo) / 1e9
    in_window = prod >= lo
    expected = total.records - total.before_window
    # Records produced in the window but never trained on: their latency is at least this long.
    unconsumed = max(expected - int(in_window.sum()), 0)
    lat = (done[in_window] - prod[in_window]) / 1e6
    by_time = np.array_split(lat[np.argsort(prod[in_window], kind="stable")], 3)
    lat = np.concatenate([lat, np.full(unconsumed, (stopped_ns - hi) / 1e6)])
    consumed_in_window = int(((done >= lo) & (done <= hi)).sum())
    return LatencyResult(rate, config, expected / window_s, consumed_in_window / window_s, lat, unconsumed,
                         window_s, _median(by_time[0]), _median(by_time[-1]), cpu)


def _median(v: np.ndarray) -> float:
    return float(np.median(v)) if len(v) else float("nan")


LATENCY_HEADER = (f"{'rate':>7} {'fetch:wait':>12} {'produced/s':>10} {'consumed/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
                  f"{'max ms':>8} {'p50 1st/last third':>19} {'unconsumed':>10} {'kept up':>7} {'trainer':>7} "
                  f"{'broker':>6} {'producer':>8} {'foreign':>7}")


def latency_line(r: LatencyResult) -> str:
    p50, p99, mx = (np.percentile(r.latencies_ms, q) if len(r.latencies_ms) else float("nan") for q in (50, 99, 100))
    bound = ">=" if r.unconsumed else "  "  # unconsumed records only bound their latency from below
    return (f"{r.rate:>7.0f} {r.config!s:>12} {r.produced_rate:>10.0f} {r.consumed_rate:>10.0f} "
            f"{bound}{p50:>6.1f} {bound}{p99:>6.1f} {bound}{mx:>6.1f} "
            f"{r.p50_first_third:>9.1f} /{r.p50_last_third:>8.1f} {r.unconsumed:>10} {'yes' if r.kept_up else 'NO':>7} "
            f"{_med([r.cpu.process if r.cpu else None]):>7} {_med([r.cpu.helper(0) if r.cpu else None]):>6} "
            f"{_med([r.cpu.helper(1) if r.cpu else None]):>8} {_med([r.cpu.foreign if r.cpu else None]):>7}")


def sustainable_rate(r: LatencyResult) -> float:
    """A rate below what the trainer managed while overloaded, rounded down to 500 records/s."""
    return max(500.0, (0.8 * r.consumed_rate) // 500 * 500)


def latency_section(args: argparse.Namespace, bootstrap: str, workload: Workload, device: torch.device,
                    meter: Meter) -> list[str]:
    torch.set_num_threads(args.latency_threads)
    print(f"(2) latency, {args.model} on {device.type}, {args.latency_threads} torch thread(s), "
          f"batch {args.batch_size}, max_wait_s {args.max_wait}, producer linger.ms {PRODUCER_LINGER_MS}, "
          f"{PARTITIONS} partitions, "
          f"window {args.seconds:g} s after {args.warmup_s:g} s warm-up, drain limit {args.drain_s:g} s. "
          f"fetch:wait = SourceSpec.fetch_records : consumer fetch.wait.max.ms. Latency: produce() call to the end "
          f"of the optimizer step that used the record; '>=' marks lower bounds (records never consumed). "
          f"trainer/broker/producer/foreign: cores busy while producing in this process / the broker / the "
          f"producer process / all other processes.", flush=True)
    print(LATENCY_HEADER, flush=True)
    verdicts = []
    for config in args.latency_configs:
        r = latency_run(args, bootstrap, workload, args.rate, config, device, meter)
        print(latency_line(r), flush=True)
        p50 = float(np.percentile(r.latencies_ms, 50)) if len(r.latencies_ms) else float("nan")
        ok = r.kept_up and p50 < LATENCY_P50_TARGET_MS
        foreign = r.cpu.foreign if r.cpu is not None else None
        contended = f" (contended: foreign {foreign:.2f} cores)" if foreign and foreign >= CONTENDED_CORES else ""
        verdicts.append(f"target {args.model} latency p50 < {LATENCY_P50_TARGET_MS:.0f} ms at {args.rate:.0f} "
                        f"records/s, fetch:wait {config}: p50 {p50:.1f} ms, "
                        f"{'kept up' if r.kept_up else 'did NOT keep up'} {'PASS' if ok else 'FAIL'}{contended}")
        if not r.kept_up:
            slower = latency_run(args, bootstrap, workload, sustainable_rate(r), config, device, meter)
            print(latency_line(slower), flush=True)
    return verdicts


# ---------------------------------------------------------------------------------------------


def machine(device: torch.device) -> str:
    cpu = cpu_name()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "not used"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, GPU: {gpu}"


def parse_configs(text: str) -> list[LatencyConfig]:
    configs = []
    for item in text.split(","):
        fetch, _, wait = item.partition(":")
        configs.append(LatencyConfig(int(fetch), None if wait in ("", "default") else int(wait)))
    return configs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp", choices=["mlp", "preact_resnet18"])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--records", type=int, default=30_000, help="records trained on per throughput run (whole batches)")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved kafka/memory pairs per thread count; 0 skips (1)")
    p.add_argument("--threads", default="1,2", help="torch CPU thread counts to measure throughput with")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-wait", type=float, default=0.05, help="SourceSpec.max_wait_s")
    p.add_argument("--fetch-records", type=int, default=SourceSpec.model_fields["fetch_records"].default,
                   help="SourceSpec.fetch_records in (1)")
    p.add_argument("--latency-configs", type=parse_configs, default=parse_configs("1024:default,128:default,128:50"),
                   help="latency runs, FETCH_RECORDS:FETCH_WAIT_MS,...: SourceSpec.fetch_records and the consumer's "
                        "fetch.wait.max.ms ('default': the library's, CONFLUENT_DEFAULTS)")
    p.add_argument("--rate", type=float, default=TARGET_RATE, help="latency producer records/s; 0 skips (2)")
    p.add_argument("--seconds", type=float, default=10.0, help="latency measurement window")
    p.add_argument("--warmup-s", type=float, default=2.0, help="latency: records produced earlier are not counted")
    p.add_argument("--drain-s", type=float, default=10.0, help="latency: wait this long for a backlog after producing")
    p.add_argument("--latency-threads", type=int, default=1, help="torch threads in the latency runs")
    p.add_argument("--no-decode-ahead", dest="decode_ahead", action="store_false",
                   help="(1): fetch and decode on the training thread instead of workers.kafka.prefetch's thread")
    p.add_argument("--switch-interval", type=float, default=None,
                   help="sys.setswitchinterval in seconds (GIL hand-over; Python's default 0.005)")
    p.add_argument("--data", default="auto", choices=["auto", "random"],
                   help="auto: real Fashion-MNIST for the MLP when installed")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    device = torch.device(args.device)
    thread_counts = [int(t) for t in args.threads.split(",")]
    workload = load_workload(args.model, trained_records(args) + SLACK_BATCHES * args.batch_size, args.data)
    print(machine(device), flush=True)
    print(f"data: {trained_records(args)} records trained on per run, of {workload.pixels[0].nbytes} bytes "
          f"({workload.source}), from a topic holding {len(workload.pixels)}; CICW-M defaults "
          f"with burn_in_steps=0; SGD lr 0.05 Nesterov; batch {args.batch_size}; GIL switch interval "
          f"{sys.getswitchinterval() * 1e3:g} ms", flush=True)
    verdicts: list[str] = []
    with EmbeddedBroker() as broker:
        pid = broker_pid(broker.port)
        meter = Meter([pid] if pid is not None else [])
        t0 = time.perf_counter()
        topic = fill_topic(broker.bootstrap, workload, args.model)
        print(f"(1) throughput, {args.model} on {device.type}: topic filled in {time.perf_counter() - t0:.1f} s, "
              f"{PARTITIONS} partitions; SourceSpec batch_size {args.batch_size}, max_wait_s {args.max_wait}, "
              f"fetch_records {args.fetch_records}; kafka feed {'with' if args.decode_ahead else 'WITHOUT'} "
              f"decode-ahead; {args.repeats} interleaved pair(s) per thread count", flush=True)
        print(THROUGHPUT_LEGEND)
        print(THROUGHPUT_HEADER, flush=True)
        for threads in thread_counts if args.repeats > 0 else []:
            pair = throughput(args, broker.bootstrap, topic, workload, threads, device, meter)
            lines = throughput_lines(pair, threads, args.model, device)
            print("\n".join(lines[:-1]), flush=True)
            verdicts.append(lines[-1])
        if args.rate > 0:
            verdicts += latency_section(args, broker.bootstrap, workload, device, meter)
    print("\n".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
