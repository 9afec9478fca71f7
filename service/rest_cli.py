"""The ``cicw-stream`` commands that drive the service over REST: submit, jobs, status, stop,
resume, delete, checkpoints, download, model, predict, metrics.

Each takes ``--url``, ``--token``, ``--timeout`` (else ``CICW_URL``, ``CICW_TOKEN``,
``CICW_TIMEOUT``, else the config file, see ``service.client_config``) and ``--json``: human
tables by default; with ``--json`` stdout holds the response model as one JSON document
(``status --watch``: one JSON line per poll) and an error is one JSON line on stderr
(``{"status": 404, "code": ..., "message": ..., "field": ..., "details": ...}``).

Exit codes (``ExitCode``; the HTTP status -> code table is ``EXIT_FOR_STATUS``):

====  =======================================================================================
0     ok
1     the job is FAILED (``status``, ``status --watch``); the service failed (5xx) or answered
      off-contract
2     usage: bad arguments, a bad spec or input file, bad client settings (checked locally,
      nothing was sent), an output path that cannot be written
3     not found (404): no such job or checkpoint, or no model yet
4     not authorised (401, 403): a missing, wrong or under-privileged token
5     conflict (409): the job's state forbids it (stop a finished job, delete a running one)
6     invalid request (400, 413, 422): the service refused the spec or the inputs
7     unreachable: connection refused, name not resolved, timed out
130   interrupted (Ctrl-C); the job itself goes on
====  =======================================================================================

Imports only the standard library at module level: ``cicw-stream --help`` and the other
commands never load the HTTP client.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    import httpx
    from pydantic import BaseModel

    from service.client import ApiClient
    from service.jobs.schemas import (
        CheckpointDetail,
        CheckpointList,
        ErrorBody,
        JobList,
        JobOut,
        MetricSeries,
        PredictResponse,
    )


class ExitCode(IntEnum):
    """What a REST command's exit status means (see the module docstring)."""

    OK = 0
    FAILED = 1
    USAGE = 2
    NOT_FOUND = 3
    AUTH = 4
    CONFLICT = 5
    INVALID = 6
    UNREACHABLE = 7
    INTERRUPTED = 130


EXIT_FOR_STATUS: Mapping[int, ExitCode] = {
    400: ExitCode.INVALID, 401: ExitCode.AUTH, 403: ExitCode.AUTH, 404: ExitCode.NOT_FOUND,
    409: ExitCode.CONFLICT, 413: ExitCode.INVALID, 422: ExitCode.INVALID,
}


def exit_code_for_status(status: int) -> ExitCode:
    """The exit code of an error answer; any status not in the table (5xx, ...) is FAILED."""
    return EXIT_FOR_STATUS.get(status, ExitCode.FAILED)


class UsageError(Exception):
    """Bad local input (arguments, files): reported with exit code 2 before anything is sent."""


@dataclass(frozen=True)
class Session:
    """What a command runs with: the client, the output mode and streams, and the clock."""

    client: ApiClient
    as_json: bool
    out: TextIO
    sleep: Callable[[float], None]

    def emit(self, model: BaseModel, human: Callable[[], str]) -> None:
        """The model as JSON, or the human rendering."""
        print(model.model_dump_json() if self.as_json else human(), file=self.out, flush=True)


# -- formatting ----------------------------------------------------------------------------------

def _num(value: float | None, fmt: str = "{:,}") -> str:
    return "-" if value is None else fmt.format(value)


def _when(value: Any) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[int] = ()) -> str:
    """Plain aligned columns, ``right`` ones (numbers) right-aligned."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join(line(r).rstrip() for r in [headers, *rows])


def fields(pairs: Sequence[tuple[str, str]]) -> str:
    """``key: value`` lines with the values aligned."""
    width = max(len(k) for k, _ in pairs) + 1
    return "\n".join(f"{k + ':':<{width}} {v}" for k, v in pairs)


def progress_line(job: JobOut) -> str:
    """One line: state, step, records, lag, records/s, loss, prequential accuracy, last checkpoint."""
    p, report = job.progress, job.progress.last_report
    parts = [job.state.value, f"step {p.step:,}", f"{p.records:,} records"]
    if p.lag is not None:
        parts.append(f"lag {p.lag:,}")
    if p.records_per_s is not None:
        parts.append(f"{p.records_per_s:,.0f} rec/s")
    if report is not None and report.loss is not None:
        parts.append(f"loss {report.loss:.3f}")
    if report is not None and report.prequential_accuracy is not None:
        parts.append(f"acc {report.prequential_accuracy:.1%}")
    if p.last_checkpoint is not None:
        parts.append(f"checkpoint @{p.last_checkpoint.step:,}")
    return " | ".join(parts)


def job_fields(job: JobOut) -> str:
    """A job's detail as ``key: value`` lines."""
    p, report = job.progress, job.progress.last_report
    ckpt = p.last_checkpoint
    lag = _num(p.lag)
    if p.lag_per_partition:
        lag += " (" + ", ".join(f"p{k}: {v:,}" for k, v in sorted(p.lag_per_partition.items())) + ")"
    pairs = [("id", job.id), ("state", job.state.value)]
    pairs += [("reason", job.reason)] if job.reason else []
    pairs += [("runs", str(job.runs)), ("created", _when(job.created_at)), ("updated", _when(job.updated_at)),
              ("ended", _when(job.ended_at)), ("step", _num(p.step)), ("records", _num(p.records)),
              ("rejected", _num(p.rejected)), ("lag", lag), ("records/s", _num(p.records_per_s, "{:,.1f}")),
              ("loss", _num(report.loss if report else None, "{:.4f}")),
              ("prequential accuracy", _num(report.prequential_accuracy if report else None, "{:.2%}")),
              ("eval accuracy", _num(report.eval_accuracy if report else None, "{:.2%}")),
              ("last report", _when(p.last_report_at)),
              ("last checkpoint", "-" if ckpt is None else f"step {ckpt.step:,} ({_when(ckpt.written_at)})")]
    return fields(pairs)


def jobs_table(jobs: JobList) -> str:
    """The jobs as a table, newest first."""
    if not jobs.items:
        return "no jobs"
    rows = [[j.id, j.state.value, str(j.runs), _num(j.progress.step), _num(j.progress.records), _num(j.progress.lag),
             _num(j.progress.records_per_s, "{:,.0f}"), _when(j.created_at)] for j in jobs.items]
    text = table(["ID", "STATE", "RUNS", "STEP", "RECORDS", "LAG", "REC/S", "CREATED"], rows, right=(2, 3, 4, 5, 6))
    return text + ("\n(more: raise --limit)" if jobs.next_cursor else "")


def checkpoints_table(ckpts: CheckpointList) -> str:
    """Checkpoints, newest first."""
    if not ckpts.items:
        return "no checkpoints"
    rows = [[c.id, _num(c.step), _num(c.examples), _when(c.written_at)] for c in ckpts.items]
    return table(["ID", "STEP", "RECORDS", "WRITTEN"], rows, right=(1, 2))


def checkpoint_fields(c: CheckpointDetail) -> str:
    """One checkpoint's detail: step, size, where each partition resumes."""
    offsets = ", ".join(f"p{k}: {v:,}" for k, v in sorted(c.offsets.items())) or "-"
    return fields([("id", c.id), ("step", _num(c.step)), ("records", _num(c.examples)),
                   ("written", _when(c.written_at)), ("size", f"{c.size_bytes:,} bytes"), ("offsets", offsets)])


def predictions_table(resp: PredictResponse) -> str:
    """A line per input: its label and that label's probability."""
    rows = [[str(i), str(p.label), _num(max(p.probabilities, default=None), "{:.4f}")]
            for i, p in enumerate(resp.predictions)]
    return f"checkpoint {resp.checkpoint} (step {resp.step:,})\n" + table(["#", "LABEL", "PROBABILITY"], rows,
                                                                         right=(0, 1, 2))


def metrics_table(series: MetricSeries) -> str:
    """The reports over time, oldest first."""
    rows = [[_when(m.at), str(m.run), _num(m.report.step), _num(m.report.examples), _num(m.report.loss, "{:.4f}"),
             _num(m.report.prequential_accuracy, "{:.2%}"), _num(m.report.eval_accuracy, "{:.2%}")]
            for m in series.points]
    head = f"{len(series.points)} of {series.total_reports} reports"
    return head + "\n" + table(["AT", "RUN", "STEP", "RECORDS", "LOSS", "ACC", "EVAL"], rows, right=(1, 2, 3, 4, 5, 6))


class _Redraw:
    """A line redrawn in place on a terminal; elsewhere written again only when it changed."""

    def __init__(self, stream: TextIO) -> None:
        self._stream, self._tty = stream, stream.isatty()
        self._last = ""

    def __call__(self, line: str) -> None:
        if self._tty:
            self._stream.write("\r" + line.ljust(len(self._last)))
        elif line != self._last:
            self._stream.write(line + "\n")
        self._last = line
        self._stream.flush()

    def close(self) -> None:
        if self._tty and self._last:
            self._stream.write("\n")
            self._stream.flush()


def _safe_name(text: str) -> str:
    # Server-chosen ids become file names: nothing that walks directories or needs quoting.
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".") or "_"


# -- local input -----------------------------------------------------------------------------------

def read_spec(path: Path) -> dict[str, Any]:
    """The spec file as parsed (YAML, or JSON for .json), checked against JobSpec so a bad field
    fails here, naming it; what is sent is the document itself (the service applies defaults)."""
    from pydantic import ValidationError

    from workers.spec import JobSpec

    data = _parse_document(path, "JSON" if path.name.endswith(".json") else "YAML")
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a job spec is a mapping (job_id, source, model, ...), got {type(data).__name__}")
    try:
        JobSpec.model_validate(data)
    except ValidationError as exc:
        raise UsageError("\n".join(f"{path}: {'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}"
                                   for e in exc.errors())) from None
    try:
        json.dumps(data, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{path}: not representable as JSON: {exc}") from None
    return data


def _parse_document(path: Path, kind: str) -> Any:
    import yaml

    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise UsageError(f"{path} is not valid {kind}: {exc}") from None


def read_inputs(source: str, stdin: TextIO) -> list[Any]:
    """Predict inputs from a file (``-``: stdin): a JSON array of inputs, or JSON lines (one input
    per non-empty line). A single array input on one line must be wrapped: ``[[0.1, 0.2]]``."""
    try:
        text = stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {source}: {exc.strerror or exc}") from None
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None
    if isinstance(whole, list):
        inputs = whole
    else:
        inputs = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    inputs.append(json.loads(line))
                except ValueError as exc:
                    raise UsageError(f"{source}:{number}: neither a JSON array nor JSON lines: {exc}") from None
    return _checked_inputs(source, inputs)


def _checked_inputs(source: str, inputs: list[Any]) -> list[Any]:
    from pydantic import ValidationError

    from service.jobs.schemas import PredictRequest

    try:
        return PredictRequest(inputs=inputs).inputs
    except ValidationError as exc:
        raise UsageError(f"{source}: {len(inputs)} inputs: {exc.errors()[0]['msg']} "
                         "(one request takes 1 to 1024; split the file)") from None


# -- the commands ------------------------------------------------------------------------------------

def _submit(args: argparse.Namespace, s: Session) -> int:
    job = s.client.submit(read_spec(Path(args.spec)))
    s.emit(job, lambda: f"submitted job {job.id} ({job.state.value})")
    return ExitCode.OK


def _jobs(args: argparse.Namespace, s: Session) -> int:
    from service.jobs.schemas import JobList, JobState

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    try:
        state = None if args.state is None else JobState(args.state.upper())
    except ValueError:
        raise UsageError(f"--state must be one of {', '.join(JobState)}, got {args.state!r}") from None
    pages = list(s.client.iter_pages(state=state, limit=args.limit))
    jobs = JobList(items=[job for page in pages for job in page.items][:args.limit], next_cursor=pages[-1].next_cursor)
    s.emit(jobs, lambda: jobs_table(jobs))
    return ExitCode.OK


def _job_exit(job: JobOut) -> int:
    from service.jobs.schemas import JobState

    return ExitCode.FAILED if job.state is JobState.FAILED else ExitCode.OK


def _status(args: argparse.Namespace, s: Session) -> int:
    if not args.watch:
        job = s.client.get_job(args.id)
        s.emit(job, lambda: job_fields(job))
        return _job_exit(job)
    if not args.interval > 0:
        raise UsageError(f"--interval must be positive, got {args.interval}")
    redraw = _Redraw(s.out)
    while True:
        job = s.client.get_job(args.id)
        if s.as_json:
            print(job.model_dump_json(), file=s.out, flush=True)
        else:
            redraw(progress_line(job))
        if not job.state.active:
            break
        s.sleep(args.interval)
    if not s.as_json:
        redraw.close()
        print(f"job {job.id} {job.state.value}" + (f": {job.reason}" if job.reason else ""), file=s.out, flush=True)
    return _job_exit(job)


def _stop(args: argparse.Namespace, s: Session) -> int:
    job = s.client.stop(args.id, args.reason)
    s.emit(job, lambda: f"job {job.id} {job.state.value}" + (f": {job.reason}" if job.reason else ""))
    return ExitCode.OK


def _resume(args: argparse.Namespace, s: Session) -> int:
    job = s.client.resume(args.id)
    s.emit(job, lambda: f"job {job.id} {job.state.value} (run {job.runs})")
    return ExitCode.OK


def _delete(args: argparse.Namespace, s: Session) -> int:
    s.client.delete(args.id, purge=args.purge)
    if not s.as_json:  # 204: nothing to print as JSON
        print(f"deleted job {args.id}" + (" and its checkpoints" if args.purge else ""), file=s.out)
    return ExitCode.OK


def _checkpoints(args: argparse.Namespace, s: Session) -> int:
    if args.ckpt is None:
        ckpts = s.client.checkpoints(args.id)
        s.emit(ckpts, lambda: checkpoints_table(ckpts))
    else:
        detail = s.client.checkpoint(args.id, args.ckpt)
        s.emit(detail, lambda: checkpoint_fields(detail))
    return ExitCode.OK


def _download(args: argparse.Namespace, s: Session) -> int:
    def destination(detail: CheckpointDetail) -> Path:
        name = f"{_safe_name(args.id)}-{_safe_name(detail.id)}.tar.gz"
        output = Path(args.output) if args.output else None
        return output if output is not None and not output.is_dir() else (output or Path()) / name

    saved = s.client.save_checkpoint(args.id, args.ckpt, destination)
    s.emit(saved, lambda: f"wrote {saved.path} ({saved.size_bytes:,} bytes): checkpoint {saved.checkpoint.id}, "
                          f"step {saved.checkpoint.step:,}")
    return ExitCode.OK


def _model(args: argparse.Namespace, s: Session) -> int:
    saved = s.client.save_model(args.id, Path(args.output or f"{_safe_name(args.id)}-model"))
    card = saved.card
    s.emit(saved, lambda: f"wrote {saved.card_path} and {saved.weights_path} ({saved.weights_bytes:,} bytes): "
                          f"{card.architecture}, {card.parameters:,} parameters, checkpoint {card.checkpoint}, "
                          f"step {card.step:,}")
    return ExitCode.OK


def _predict(args: argparse.Namespace, s: Session) -> int:
    resp = s.client.predict(args.id, read_inputs(args.file, sys.stdin))
    s.emit(resp, lambda: predictions_table(resp))
    return ExitCode.OK


def _metrics(args: argparse.Namespace, s: Session) -> int:
    if args.max_points is not None and args.max_points < 1:
        raise UsageError(f"--max-points must be at least 1, got {args.max_points}")
    series = s.client.metrics(args.id, max_points=args.max_points)
    s.emit(series, lambda: metrics_table(series))
    return ExitCode.OK


# -- wiring ----------------------------------------------------------------------------------------

def add_rest_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the REST subcommands on ``cicw-stream``'s subparsers; each sets ``rest`` (the
    command function) for :func:`run`."""
    common = argparse.ArgumentParser(add_help=False)
    service = common.add_argument_group("service")
    service.add_argument("--url", help="service base URL (else $CICW_URL, the config file, http://127.0.0.1:8321)")
    service.add_argument("--token", help="bearer token (else $CICW_TOKEN or the config file; "
                                         "prefer those: a flag shows in the process list)")
    service.add_argument("--timeout", dest="timeout_s", type=float, metavar="SECONDS",
                         help="connect/read timeout (else $CICW_TIMEOUT, the config file, 30)")
    service.add_argument("--json", action="store_true", help="print the response as JSON (errors: JSON on stderr)")

    def add(name: str, help: str, run: Callable[[argparse.Namespace, Session], int]) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help, parents=[common])
        parser.set_defaults(rest=run)
        return parser

    add("submit", "submit a job spec (YAML or JSON, checked locally first) to the service",
        _submit).add_argument("spec", help="job spec file (.yaml, .yml or .json)")
    jobs = add("jobs", "list the service's jobs, newest first", _jobs)
    jobs.add_argument("--state", help="only jobs in this state: PENDING, RUNNING, STOPPING, STOPPED, FAILED, "
                                      "SUCCEEDED")
    jobs.add_argument("--limit", type=int, help="at most this many (default: all, page by page)")
    status = add("status", "a job's state and progress (exit 1 if it FAILED)", _status)
    status.add_argument("id")
    status.add_argument("--watch", action="store_true", help="redraw the progress line until the job ends")
    status.add_argument("--interval", type=float, default=2.0, metavar="SECONDS", help="poll interval (default 2)")
    stop = add("stop", "checkpoint and stop a job", _stop)
    stop.add_argument("id")
    stop.add_argument("--reason", help="recorded as the job's reason")
    add("resume", "run a stopped or failed job again from its latest checkpoint", _resume).add_argument("id")
    delete = add("delete", "forget a job that is not running", _delete)
    delete.add_argument("id")
    delete.add_argument("--purge", action="store_true", help="also delete its checkpoints")
    ckpts = add("checkpoints", "a job's checkpoints, or one checkpoint's detail", _checkpoints)
    ckpts.add_argument("id")
    ckpts.add_argument("ckpt", nargs="?", help="a checkpoint id or 'latest': show its offsets and size")
    download = add("download", "download a checkpoint as tar.gz", _download)
    download.add_argument("id")
    download.add_argument("ckpt", nargs="?", default="latest", help="checkpoint id (default: latest)")
    download.add_argument("-o", "--output", help="file to write (default: ./<job>-<checkpoint>.tar.gz)")
    model = add("model", "download the latest model: its card (JSON) and weights (safetensors)", _model)
    model.add_argument("id")
    model.add_argument("-o", "--output", help="directory (default: ./<job>-model/)")
    predict = add("predict", "labels of inputs (a JSON array or JSON lines; '-': stdin) by the latest model",
                  _predict)
    predict.add_argument("id")
    predict.add_argument("file")
    metrics = add("metrics", "a job's reports over time", _metrics)
    metrics.add_argument("id")
    metrics.add_argument("--max-points", dest="max_points", type=int, help="downsample to at most N reports")


def run(args: argparse.Namespace, *, transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] | None = None) -> int:
    """Run the REST command ``args.rest`` and map every failure to its exit code and one message
    on stderr (JSON with --json). ``transport`` replaces the network (tests); ``sleep`` the wait
    between ``--watch`` polls."""
    from service.client import ApiClient, ApiError, ApiProtocolError, ApiUnreachable
    from service.client_config import ClientConfigError, resolve_config
    from service.jobs.schemas import ErrorBody

    prog = f"cicw-stream {args.command}"
    token = args.token or ""

    def fail(code: ExitCode, status: int | None, body: ErrorBody) -> int:
        if args.json:
            line = json.dumps({"status": status, **body.model_dump(mode="json")})
        else:
            line = f"{prog}: {body.message}" + (f" ({body.field})" if body.field else "")
            line += f" [HTTP {status} {body.code}]" if status is not None else ""
        print(_redact(line, token), file=sys.stderr, flush=True)
        return code

    try:
        config = resolve_config(url=args.url, token=args.token, timeout_s=args.timeout_s,
                                warn=lambda msg: print(f"{prog}: warning: {msg}", file=sys.stderr))
        token = config.token.get_secret_value() if config.token else ""
        with ApiClient(config, transport=transport) as client:
            return int(args.rest(args, Session(client, args.json, sys.stdout, sleep or time.sleep)))
    except (UsageError, ClientConfigError) as exc:
        return fail(ExitCode.USAGE, None, ErrorBody(code="usage", message=str(exc)))
    except ApiError as exc:
        return fail(exit_code_for_status(exc.status), exc.status, exc.body)
    except ApiUnreachable as exc:
        return fail(ExitCode.UNREACHABLE, None, ErrorBody(code="unreachable", message=str(exc)))
    except ApiProtocolError as exc:
        return fail(ExitCode.FAILED, None, ErrorBody(code="protocol_error", message=str(exc)))
    except OSError as exc:  # an output file or directory that cannot be written
        where = f" {exc.filename}" if exc.filename else ""
        message = f"cannot write{where}: {exc.strerror or exc}"
        return fail(ExitCode.USAGE, None, ErrorBody(code="local_io", message=message))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return fail(ExitCode.INTERRUPTED, None, ErrorBody(code="interrupted", message="interrupted; the job goes on"))


def _redact(text: str, token: str) -> str:
    # The token never reaches the output, even if a misbehaving server echoes it in a message.
    return text.replace(token, "***") if len(token) >= 4 else text
