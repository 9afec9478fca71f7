"""The ``cicw-stream`` command line. Subcommands import what they need lazily, so ``--help`` is fast
and a subcommand never pulls in HTTP code it does not use. The commands that drive the service
over REST live in ``service.rest_cli`` (exit codes documented there)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from service.rest_cli import add_rest_commands
from service.server import add_parser as add_serve_parser

if TYPE_CHECKING:
    import httpx

    from workers.report import JobResult


def _version() -> str:
    try:
        return version("cicw-stream")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _moons(args: argparse.Namespace) -> int:
    from cicw.examples import two_moons

    return two_moons.main(["--out", args.out, "--seed", str(args.seed)])


def _broker(args: argparse.Namespace) -> int:
    import signal
    import threading

    from workers.kafka.broker import BrokerError, EmbeddedBroker

    stop = threading.Event()
    # The handler only sets the event; the main thread stops the broker.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        broker = EmbeddedBroker(host=args.host, port=args.port).start()
    except BrokerError as exc:
        print(f"cicw-stream broker: {exc}", file=sys.stderr)
        return 1
    print(broker.bootstrap, flush=True)
    try:
        while not stop.wait(0.5):
            if not broker.running:
                print(f"cicw-stream broker: broker process exited; log: {broker.log_path}", file=sys.stderr)
                return 1
    finally:
        broker.stop()
    return 0


def _produce(args: argparse.Namespace) -> int:
    from confluent_kafka import Producer
    from pydantic import ValidationError

    from workers.data.datasets import DatasetError
    from workers.data.produce import ProduceSpec, produce
    from workers.kafka.clients import SourceClientError
    from workers.kafka.topics import ensure_topic

    fields = {k: v for k, v in vars(args).items() if k not in ("command", "run") and v is not None}
    try:
        spec = ProduceSpec(**fields)
    except ValidationError as exc:
        for err in exc.errors():
            print(f"cicw-stream produce: --{'.'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}",
                  file=sys.stderr)
        return 2
    try:
        partitions = ensure_topic(spec.bootstrap_servers, spec.topic, spec.partitions)
        report = produce(spec, Producer({"bootstrap.servers": spec.bootstrap_servers}), partitions=partitions)
    except (DatasetError, SourceClientError, RuntimeError) as exc:
        print(f"cicw-stream produce: {exc}", file=sys.stderr)
        return 1
    print(f"{report.records} records to {spec.topic} in {report.seconds:.2f} s "
          f"({report.corrupted} with a corrupted label)")
    return 0


def _train(args: argparse.Namespace) -> int:
    import signal

    from pydantic import ValidationError

    from service.progress import ProgressPrinter
    from workers.errors import CicwStreamError
    from workers.runner import connect_ray, failed_result, preflight, run_job
    from workers.spec import JobSpec
    from workers.train.models import allowed_model_packages

    try:
        spec = JobSpec.from_file(args.spec)
    except OSError as exc:
        print(f"cicw-stream train: cannot read {args.spec}: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        for err in exc.errors():
            print(f"cicw-stream train: {args.spec}: {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2
    model_packages = allowed_model_packages()
    try:
        preflight(spec, model_packages)  # before Ray starts: a bad model or broker fails in seconds
        connect_ray(args.ray_address)
    except CicwStreamError as exc:
        return _summarise(failed_result(spec, str(exc)), as_json=args.json)
    stop: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        # First signal: checkpoint and stop. Second: the default action (abort at once).
        stop.append(f"{signal.Signals(signum).name} received")
        signal.signal(signum, previous[signal.Signals(signum)])
        print(f"\ncicw-stream train: {stop[0]}: finishing the step and writing a checkpoint "
              "(again to abort without one)", file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    progress = ProgressPrinter(sys.stderr) if not args.quiet else None
    try:
        result = run_job(spec, model_packages=model_packages, on_report=progress,
                         stop_requested=lambda: stop[0] if stop else None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if progress is not None:
            progress.close()
    return _summarise(result, as_json=args.json)


def summary_lines(result: JobResult) -> list[str]:
    """The text summary: how the job ended, its durable checkpoint, then the last report's fields."""
    head = {"job_id": result.job_id, "state": result.state, "checkpoint": result.checkpoint,
            "checkpoint_step": result.checkpoint_step}
    if result.error is not None:
        head["error"] = result.error
    fields = (result.report.model_dump(exclude={"offsets", "cicw", "checkpoint_step"}, exclude_none=True)
              if result.report is not None else {})
    return [f"{key}: {value}" for key, value in {**head, **fields}.items()]


def _summarise(result: JobResult, *, as_json: bool) -> int:
    """Print a finished job's summary (JSON: the JobResult; text: one line per field); the exit
    code for its state."""
    if as_json:
        print(result.model_dump_json())
    else:
        print("\n".join(summary_lines(result)))
    return 1 if result.state == "failed" else 0


def _demo(args: argparse.Namespace) -> int:
    from service.demo import run_demo
    from service.progress import ProgressPrinter
    from workers.runner import connect_ray

    checks = (("records", args.records, args.records >= 1, "at least 1"),
              ("noise-rate", args.noise_rate, 0 <= args.noise_rate < 1, "in [0, 1)"),
              ("workers", args.workers, args.workers >= 1, "at least 1"))
    problems = [f"--{name} must be {allowed}, got {value}" for name, value, ok, allowed in checks if not ok]
    if problems:
        print(f"cicw-stream demo: {'; '.join(problems)}", file=sys.stderr)
        return 2
    connect_ray(None)
    progress = ProgressPrinter(sys.stderr) if not args.quiet else None
    try:
        result = run_demo(records=args.records, noise_rate=args.noise_rate, checkpoints=args.checkpoints,
                          workers=args.workers, on_report=progress,
                          say=lambda line: print(f"cicw-stream demo: {line}", file=sys.stderr, flush=True))
    finally:
        if progress is not None:
            progress.close()
    return _summarise(result, as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cicw-stream",
        description="Continuous training on noisy-labelled streams with CICW.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    moons = sub.add_parser("moons", help="two-moons illustration: CE against CIW under 30%% label noise")
    moons.add_argument("--out", default="moons.png", help="PNG to write (default: moons.png)")
    moons.add_argument("--seed", type=int, default=0)
    moons.set_defaults(run=_moons)
    broker = sub.add_parser("broker", help="run the embedded Kafka-compatible broker (in-memory) on loopback; "
                                           "prints its bootstrap address")
    broker.add_argument("--host", default="127.0.0.1")
    broker.add_argument("--port", type=int, default=9092)
    broker.set_defaults(run=_broker)
    prod = sub.add_parser("produce", help="stream a dataset into a topic, with optional synthetic label noise "
                                          "(true label kept in the clean_label header)")
    prod.add_argument("--bootstrap-servers", dest="bootstrap_servers", required=True)
    prod.add_argument("--topic", required=True)
    prod.add_argument("--dataset", required=True, help="fashion_mnist, cifar10, npz or csv")
    prod.add_argument("--path", help="dataset file or folder")
    prod.add_argument("--split", help="train (default) or test")
    prod.add_argument("--format", help="record format: raw (default), json or image")
    prod.add_argument("--noise", help="none (default), symmetric, uniform or asymmetric")
    prod.add_argument("--rate", type=float, help="noise rate in [0, 1]")
    prod.add_argument("--seed", type=int)
    prod.add_argument("--passes", type=int)
    prod.add_argument("--limit", type=int, help="use only the first N examples")
    prod.add_argument("--records-per-s", dest="records_per_s", type=float, help="rate limit")
    prod.add_argument("--partitions", type=int, help="partitions if the topic is created (default 4)")
    prod.set_defaults(run=_produce)
    train = sub.add_parser("train", help="run one job (a JobSpec in YAML or JSON) in the foreground on Ray Train; "
                                         "Ctrl-C or SIGTERM checkpoints and stops it, running it again resumes")
    train.add_argument("spec", help="job spec file (.yaml, .yml or .json)")
    train.add_argument("--ray-address", help="host:port of an existing Ray cluster's GCS, or ray://host:port "
                                             "(default: start a fresh local Ray)")
    train.add_argument("--json", action="store_true", help="print the final summary as JSON")
    train.add_argument("--quiet", action="store_true", help="no progress line (stderr)")
    train.set_defaults(run=_train)
    demo = sub.add_parser("demo", help="the main job end to end on embedded defaults (what `make demo` runs): "
                                       "embedded broker, noisy records, a bounded CICW-M job on a local Ray")
    demo.add_argument("--records", type=int, default=20000, help="training records (default 20000)")
    demo.add_argument("--noise-rate", dest="noise_rate", type=float, default=0.4,
                      help="share of labels flipped (default 0.4)")
    demo.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    demo.add_argument("--checkpoints", default="./demo-checkpoints",
                      help="checkpoint storage (default ./demo-checkpoints)")
    demo.add_argument("--json", action="store_true", help="print the final summary as JSON")
    demo.add_argument("--quiet", action="store_true", help="no progress line (stderr)")
    demo.set_defaults(run=_demo)
    add_serve_parser(sub)
    add_rest_commands(sub)  # submit, jobs, status, stop, resume, delete, checkpoints, download, model, ...
    return parser


def main(argv: Sequence[str] | None = None, *, transport: httpx.BaseTransport | None = None,
         sleep: Callable[[float], None] | None = None) -> int:
    """Run one command. The REST commands talk through ``transport`` when given (tests: an
    httpx.MockTransport) and wait between ``status --watch`` polls with ``sleep``."""
    args = build_parser().parse_args(argv)
    if getattr(args, "rest", None) is not None:
        from service.rest_cli import run

        return run(args, transport=transport, sleep=sleep)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
