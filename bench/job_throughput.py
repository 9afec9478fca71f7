"""The whole job against the in-memory loop: records/s of `run_job` (Ray Train worker, KafkaSource,
decode-ahead, CICW step, per-step collective, reports, checkpoints) beside the same model,
optimizer and CICW config trained from tensors in memory in this process, in one run.

bench/stream_train.py measures the feed alone (source + decode + step in one process); this
measures what a user's job gets, so costs that live only in the job show up here: the per-step
decision collective, metric windows, reports through Ray Train and the JobChannel, checkpoints.
(It is how the report throttle was found: ray.train.report blocks until Ray Train's controller,
polling every 2 s, took the previous report, so a job reporting every 10 steps trained at 10
steps per 2 s.)

Job rate = steady state, from the job's own reports: the examples between the first and the last
periodic report over the time between them (worker clocks; start-up, the first window, and the
end-of-stream check are left out). Its wall time from run_job() to its return is printed too.
Memory rate = the same step on the decoded tensors, torch threads = the job's CPUs per worker.
The ratio is per worker: job rate / (workers x memory rate); with more workers than free cores
it measures the machine, not the job. Runs alternate order; medians over repeats.

Records: 784 raw uint8 bytes (Fashion-MNIST when the Debian package is installed), as
bench/stream_train.py writes them. CICW defaults with burn_in_steps=0 (every step does the full
weighting), the job spec's default optimizer. The embedded broker runs on this machine.

    python bench/job_throughput.py                              # 1 worker, 40k records, 3 repeats
    python bench/job_throughput.py --workers 2 --records 60000
    python bench/job_throughput.py --report-every 1             # a report every step
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

import ray
import torch
from machine_info import cpu_name  # bench/ is on sys.path when a bench script runs
from stream_train import SLACK_BATCHES, Workload, decoded_in_memory, fill_topic, load_workload

from cicw import CICWConfig, CICWLoss
from workers.kafka.broker import EmbeddedBroker
from workers.kafka.dead_letters import dlq_topic
from workers.kafka.topics import ensure_topic
from workers.report import JobReport
from workers.runner import run_job
from workers.spec import JobSpec
from workers.train.models import build_model
from workers.train.step import Learner, build_optimizer

TARGET = 0.9


@dataclass(frozen=True)
class JobRun:
    steady_rate: float  # records/s between the first and the last periodic report
    wall_s: float  # run_job() call to return
    steps: int
    reports: int


def job_spec(args: argparse.Namespace, workload: Workload, bootstrap: str, topic: str, checkpoints: str) -> JobSpec:
    return JobSpec.model_validate({
        "job_id": f"bench-{uuid.uuid4().hex[:6]}",
        "source": {"bootstrap_servers": bootstrap, "topic": topic, "stop_at": "end", "batch_size": args.batch_size},
        "codec": workload.codec.model_dump(mode="json"),
        "model": {"name": args.model},
        "cicw": CICWConfig(gate="steps", burn_in_steps=0).model_dump(mode="json"),
        "scaling": {"num_workers": args.workers, "use_gpu": args.gpu},
        "checkpoint": {"every_steps": args.checkpoint_every, "keep": 1, "storage_path": checkpoints},
        "report_every_steps": args.report_every,
        "max_failures": 0,
    })


def run_memory(spec: JobSpec, x: torch.Tensor, y: torch.Tensor) -> float:
    """Records/s of the job's model, optimizer and CICW config on tensors in memory (on the GPU
    when the spec asks for one: copied there first, as a job's batches are step by step)."""
    device = torch.device("cuda" if spec.scaling.use_gpu else "cpu")
    torch.manual_seed(spec.seed)
    model = build_model(spec.model.name, in_shape=spec.codec.input_shape, num_classes=spec.codec.num_classes)
    model = model.to(device)
    optimizer, scheduler = build_optimizer(spec.optimizer, model.parameters())
    loss_fn = CICWLoss(spec.cicw, num_classes=spec.codec.num_classes,
                       generator=torch.Generator(device=device).manual_seed(0))
    learner = Learner(model, optimizer, scheduler, loss_fn, device)  # the job's own step
    size = spec.source.batch_size
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for i in range(0, len(x), size):
        learner.step(x[i:i + size], y[i:i + size])
    sync()
    return len(x) / (time.perf_counter() - start)


def run_in_ray(spec: JobSpec) -> JobRun:
    reports: list[JobReport] = []
    start = time.perf_counter()
    result = run_job(spec, on_report=reports.append)
    wall = time.perf_counter() - start
    if result.state != "finished" or result.report is None:
        raise RuntimeError(f"job {result.state}: {result.error}")
    periodic = [m for m in reports if not m.final and m.step > 0]
    # Window i spans reports i-1..i: its examples over its records_per_s is its duration.
    windows = [(b.examples - a.examples, b.records_per_s or 0.0) for a, b in itertools.pairwise(periodic)]
    examples = sum(n for n, _ in windows)
    seconds = sum(n / rate for n, rate in windows if rate > 0)
    if not seconds:
        raise RuntimeError(f"too few reports ({len(periodic)}) for a steady rate: more --records")
    return JobRun(examples / seconds, wall, result.report.step, len(reports))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=40_000, help="records in the topic (whole batches are trained)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (1 CPU each)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128, help="records per worker per step")
    p.add_argument("--report-every", type=int, default=10, help="JobSpec.report_every_steps")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="JobSpec.checkpoint.every_steps (default: the spec's, every 60 s, so only the last one here)")
    p.add_argument("--data", default="auto", choices=["auto", "random"],
                   help="auto: Fashion-MNIST if installed, else random pixels")
    p.add_argument("--model", default="mlp", choices=["mlp", "preact_resnet18"],
                   help="preact_resnet18 trains on random CIFAR-shaped [3, 32, 32] records")
    p.add_argument("--gpu", action="store_true",
                   help="one GPU per worker (scaling.use_gpu; NCCL); the in-memory side runs on cuda too")
    args = p.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        p.error("--gpu needs a CUDA device")
    if min(args.records, args.workers, args.repeats, args.batch_size, args.report_every) < 1:
        p.error("--records, --workers, --repeats, --batch-size and --report-every must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # as a Ray worker with 1 CPU (OMP_NUM_THREADS=1)
    workload = load_workload(args.model, args.records + SLACK_BATCHES * args.batch_size, args.data)
    x, y = decoded_in_memory(workload)
    per_rank = args.records // (args.batch_size * args.workers) * args.batch_size
    x, y = x[:per_rank], y[:per_rank]
    gpu = f", GPU {torch.cuda.get_device_name()}" if args.gpu else ""
    print(f"# {cpu_name()}{gpu}, torch {torch.__version__}, ray {ray.__version__}; {args.model} on {workload.source}; "
          f"{args.workers} worker(s), batch {args.batch_size}/worker, report every {args.report_every} steps, "
          f"checkpoint every {args.checkpoint_every or 'default'}", flush=True)
    memory_rates: list[float] = []
    jobs: list[JobRun] = []
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory(prefix="bench-ckpt-") as checkpoints:
        ray.init(num_cpus=args.workers, num_gpus=args.workers if args.gpu else 0, include_dashboard=False,
                 log_to_driver=False)
        try:
            for r in range(args.repeats):
                topic = fill_topic(broker.bootstrap, workload, f"job{r}")
                ensure_topic(broker.bootstrap, dlq_topic(topic), 1)
                spec = job_spec(args, workload, broker.bootstrap, topic, checkpoints)
                order = ["memory", "job"] if r % 2 == 0 else ["job", "memory"]
                for name in order:
                    if name == "memory":
                        memory_rates.append(run_memory(spec, x, y))
                    else:
                        jobs.append(run_in_ray(spec))
                job = jobs[-1]
                print(f"repeat {r}: memory {memory_rates[-1]:8.0f} rec/s | job {job.steady_rate:8.0f} rec/s steady "
                      f"({job.steps} steps, {job.reports} reports, {job.wall_s:.1f} s wall) | job/memory per worker "
                      f"{job.steady_rate / (args.workers * memory_rates[-1]):.3f}", flush=True)
        finally:
            ray.shutdown()
    ratios = [j.steady_rate / (args.workers * m) for j, m in zip(jobs, memory_rates, strict=True)]
    ratio = statistics.median(ratios)
    print(f"job/memory per worker: median {ratio:.3f} over {len(ratios)} pair(s): "
          + ", ".join(f"{v:.3f}" for v in ratios))
    where = "GPU" if args.gpu else "CPU"
    print(f"{'PASS' if ratio >= TARGET else 'FAIL'}: job >= {TARGET} x in-memory throughput ({args.model}, {where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
