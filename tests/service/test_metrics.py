"""The service's Prometheus metrics: families built from job reports at scrape time, read back with
prometheus_client's own parser, checked by promtool, and scraped by a real Prometheus server."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import accumulate
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import REGISTRY

from cicw.config import WEIGHT_HISTOGRAM_EDGES
from service.core.metrics import HttpMetrics, JobCollector, JobMetricsView, build_registry
from service.jobs.schemas import JobState
from workers.report import STEP_SECONDS_EDGES, JobReport

REPO = Path(__file__).resolve().parents[2]
Labels = frozenset[tuple[str, str]]


def _report(**changes: Any) -> JobReport:
    fields: dict[str, Any] = {
        "step": 40, "examples": 1280, "rejected": 3, "lag": 7, "lag_per_partition": {0: 7, 2: 0},
        "records_per_s": 950.5, "loss": 0.42, "prequential_accuracy": 0.8, "noise_precision": 0.9,
        "noise_recall": 0.6, "eval_accuracy": 0.85, "checkpoint_seconds": 0.3,
        # 4 steps in (5 ms, 10 ms], 10 in (10 ms, 25 ms], 1 above 10 s
        "step_seconds_buckets": [0, 4, 10, 0, 0, 0, 0, 0, 0, 0, 0, 1], "step_seconds_sum": 10.25,
        "step_seconds_count": 15,
        # 32 examples: 1 with N*w < 1/8, 2 in [1/8, 1/4) (so 3/32 down-weighted), ...
        "cicw": {"num_examples": 32, "ess": 25.5, "low_weight_fraction": 3 / 32,
                 "weight_histogram": [1, 2, 0, 5, 20, 4, 0, 0], "class_count": [12, 0, 20],
                 "class_mean_weight": [1.2, None, 0.88], "class_mass_moved": 0.05},
    }
    return JobReport.model_validate({**fields, **changes})


def _view(job_id: str = "j1", state: JobState = JobState.RUNNING, report: JobReport | None = None,
          last_checkpoint_at: datetime | None = None) -> JobMetricsView:
    return JobMetricsView(job_id=job_id, state=state, report=report, last_checkpoint_at=last_checkpoint_at)


def _exposition(*views: JobMetricsView, now: float = 0.0) -> str:
    return generate_latest(build_registry(lambda: views, clock=lambda: now)).decode()


def _samples(text: str) -> dict[str, dict[Labels, float]]:
    """Sample name -> labels -> value, as prometheus_client's parser reads the exposition back."""
    out: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def _job(job: str, **labels: str) -> Labels:
    return frozenset({"job": job, **labels}.items())


def _types(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def test_each_report_field_is_a_sample_of_its_job() -> None:
    first, second = _report(), _report(step=7, examples=224, rejected=0, loss=1.5, eval_accuracy=0.5)
    text = _exposition(_view("j1", report=first), _view("j2", report=second))
    samples, types = _samples(text), _types(text)
    for job, r in (("j1", first), ("j2", second)):
        assert r.cicw is not None
        expected = {
            "cicw_records_trained_total": r.examples, "cicw_records_rejected_total": r.rejected,
            "cicw_optimizer_steps_total": r.step, "cicw_loss": r.loss,
            "cicw_prequential_accuracy_ratio": r.prequential_accuracy, "cicw_eval_accuracy_ratio": r.eval_accuracy,
            "cicw_records_per_second": r.records_per_s, "cicw_checkpoint_duration_seconds": r.checkpoint_seconds,
            "cicw_effective_sample_size": r.cicw.ess, "cicw_down_weighted_ratio": r.cicw.low_weight_fraction,
            "cicw_class_weight_mass_moved_ratio": r.cicw.class_mass_moved,
            "cicw_noise_precision_ratio": r.noise_precision, "cicw_noise_recall_ratio": r.noise_recall,
        }
        assert {name: samples[name][_job(job)] for name in expected} == expected
    assert {types[n] for n in ("cicw_records_trained", "cicw_records_rejected", "cicw_optimizer_steps")} == {"counter"}
    assert types["cicw_loss"] == types["cicw_checkpoint_duration_seconds"] == "gauge"


def test_undefined_values_are_left_out_never_nan() -> None:
    sparse = _report(noise_precision=None, noise_recall=float("nan"), eval_accuracy=None, checkpoint_seconds=None,
                     lag_per_partition={}, step_seconds_buckets=[], step_seconds_count=0, step_seconds_sum=0.0,
                     cicw={"num_examples": 8, "class_mean_weight": [None, 1.0]})
    text = _exposition(_view("j1", report=sparse), _view("new", JobState.PENDING))
    samples = _samples(text)
    assert "NaN" not in text
    for absent in ("cicw_noise_precision_ratio", "cicw_noise_recall_ratio", "cicw_eval_accuracy_ratio",
                   "cicw_checkpoint_duration_seconds", "cicw_effective_sample_size", "cicw_down_weighted_ratio",
                   "cicw_consumer_lag_records", "cicw_step_duration_seconds_bucket", "cicw_instance_weight_bucket",
                   "cicw_checkpoint_age_seconds"):
        assert absent not in samples, absent
    assert samples["cicw_class_mean_weight"] == {_job("j1", **{"class": "1"}): 1.0}
    # A job without a report yet has its state and nothing else.
    assert {name for name, by_labels in samples.items() if any(("job", "new") in k for k in by_labels)} == {
        "cicw_job_state"}
    assert samples["cicw_records_trained_total"] == {_job("j1"): sparse.examples}


def test_lag_is_per_partition_and_class_weight_per_class() -> None:
    samples = _samples(_exposition(_view("j1", report=_report())))
    assert samples["cicw_consumer_lag_records"] == {_job("j1", partition="0"): 7, _job("j1", partition="2"): 0}
    assert samples["cicw_class_mean_weight"] == {_job("j1", **{"class": "0"}): 1.2,
                                                 _job("j1", **{"class": "2"}): 0.88}


def test_label_quality_is_per_source_and_undefined_values_are_left_out() -> None:
    sources = [{"source": "crowd", "records": 900, "weighed": 800, "mean_weight": 0.8,
                "down_weighted_fraction": 0.25, "disagreement": 0.31, "estimated_noise": 0.3, "true_noise": 0.29},
               {"source": "other", "records": 40, "weighed": 0}]
    text = _exposition(_view("j1", report=_report(sources=sources)), _view("j2", report=_report()))
    samples = _samples(text)
    assert samples["cicw_source_records_total"] == {_job("j1", source="crowd"): 900,
                                                    _job("j1", source="other"): 40}
    assert samples["cicw_source_mean_weight"] == {_job("j1", source="crowd"): 0.8}
    assert samples["cicw_source_down_weighted_ratio"] == {_job("j1", source="crowd"): 0.25}
    assert samples["cicw_source_estimated_noise_ratio"] == {_job("j1", source="crowd"): 0.3}
    assert samples["cicw_source_true_noise_ratio"] == {_job("j1", source="crowd"): 0.29}
    assert _types(text)["cicw_source_records"] == "counter"


def _buckets(samples: dict[str, dict[Labels, float]], name: str, job: str) -> list[tuple[float, float]]:
    """(le, count) of one job's histogram, in le order."""
    found = [(float(dict(k)["le"]), v) for k, v in samples[f"{name}_bucket"].items() if dict(k)["job"] == job]
    return sorted(found)


def test_step_duration_histogram_is_cumulative_and_inf_is_the_count() -> None:
    r = _report()
    samples = _samples(_exposition(_view("j1", report=r)))
    buckets = _buckets(samples, "cicw_step_duration_seconds", "j1")
    assert [le for le, _ in buckets] == [*STEP_SECONDS_EDGES, math.inf]
    assert [count for _, count in buckets] == list(accumulate(r.step_seconds_buckets))
    assert buckets[-1][1] == samples["cicw_step_duration_seconds_count"][_job("j1")] == r.step_seconds_count
    assert samples["cicw_step_duration_seconds_sum"][_job("j1")] == r.step_seconds_sum


def test_instance_weights_are_a_gauge_histogram_over_cicw_edges() -> None:
    r = _report()
    assert r.cicw is not None
    text = generate_latest(build_registry(lambda: [_view("j1", report=r)])).decode()
    samples = _samples(text)
    buckets = _buckets(samples, "cicw_instance_weight", "j1")
    assert [le for le, _ in buckets] == list(WEIGHT_HISTOGRAM_EDGES[1:])
    assert [count for _, count in buckets] == list(accumulate(r.cicw.weight_histogram))
    assert buckets[-1][1] == samples["cicw_instance_weight_gcount"][_job("j1")] == r.cicw.num_examples
    assert samples["cicw_instance_weight_gsum"][_job("j1")] == r.cicw.num_examples  # the N*w of N examples
    # cicw's bins are [a, b): the le=1/4 bucket is the down-weighted fraction's numerator.
    assert dict(buckets)[0.25] / buckets[-1][1] == r.cicw.low_weight_fraction
    assert "# TYPE cicw_instance_weight histogram" in text  # the text format's name for a gauge histogram


@pytest.mark.parametrize("state", list(JobState))
def test_job_state_is_one_hot_over_every_state(state: JobState) -> None:
    samples = _samples(_exposition(_view("j1", state, report=_report()), _view("other", JobState.FAILED)))
    mine = {dict(k)["state"]: v for k, v in samples["cicw_job_state"].items() if dict(k)["job"] == "j1"}
    assert mine == {s.value: float(s == state) for s in JobState}


def test_checkpoint_age_follows_the_injected_clock() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    now = [at.timestamp() + 90.0]
    views = [_view("aware", last_checkpoint_at=at), _view("naive", last_checkpoint_at=at.replace(tzinfo=None)),
             _view("ahead", last_checkpoint_at=at + timedelta(hours=1)), _view("none")]
    registry = build_registry(lambda: views, clock=lambda: now[0])
    ages = _samples(generate_latest(registry).decode())["cicw_checkpoint_age_seconds"]
    # A naive time is UTC (as SQLite returns it); one ahead of the clock reads 0, not a negative age.
    assert ages == {_job("aware"): 90.0, _job("naive"): 90.0, _job("ahead"): 0.0}
    now[0] += 60.0
    assert _samples(generate_latest(registry).decode())["cicw_checkpoint_age_seconds"][_job("aware")] == 150.0


def test_the_collector_reads_the_jobs_at_each_scrape_and_describes_itself_without_them() -> None:
    calls: list[int] = []
    views: list[JobMetricsView] = []

    def jobs() -> list[JobMetricsView]:
        calls.append(1)
        return views

    registry = build_registry(jobs)
    assert calls == []  # registering asked describe(), not the store
    assert "cicw_records_trained_total" not in _samples(generate_latest(registry).decode())
    views.append(_view("j1", report=_report()))
    assert _samples(generate_latest(registry).decode())["cicw_records_trained_total"] == {_job("j1"): 1280}
    assert len(calls) == 2
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(JobCollector(jobs))
    assert "cicw_records_trained_total" not in generate_latest(REGISTRY).decode()  # nothing global


def test_http_metrics_count_by_route_template_and_bounded_method() -> None:
    registry = CollectorRegistry()
    http = HttpMetrics(registry)
    http.observe("GET", "/v1/jobs/{job_id}", 200, 0.02)
    http.observe("get", "/v1/jobs/{job_id}", 200, 0.2)
    http.observe("GET", "/v1/jobs/{job_id}", 404, 0.001)
    http.observe("BREW", "/v1/jobs", 405, 0.003)  # any method a client invents is "other"
    samples = _samples(generate_latest(registry).decode())
    count = samples["cicw_http_requests_total"]
    assert count == {frozenset({"method": "GET", "route": "/v1/jobs/{job_id}", "status": "200"}.items()): 2,
                     frozenset({"method": "GET", "route": "/v1/jobs/{job_id}", "status": "404"}.items()): 1,
                     frozenset({"method": "other", "route": "/v1/jobs", "status": "405"}.items()): 1}
    latency = samples["cicw_http_request_duration_seconds_bucket"]
    get = {float(dict(k)["le"]): v for k, v in latency.items() if dict(k)["route"] == "/v1/jobs/{job_id}"}
    assert get[0.005] == 1 and get[0.025] == 2 and get[math.inf] == 3
    assert samples["cicw_http_request_duration_seconds_count"][
        frozenset({"method": "GET", "route": "/v1/jobs/{job_id}"}.items())] == 3


def test_the_metrics_module_imports_without_torch() -> None:
    code = "import sys, service.core.metrics; print(','.join(m for m in ('torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == ""


# -- promtool and a real Prometheus server (Debian's package, unpacked by `make prometheus`) -------


def _tool(name: str) -> Path:
    """The unpacked binary (or one on PATH); skips when there is none, except under CI."""
    unpacked = REPO / ".venv" / "prometheus" / "usr" / "bin" / name
    found = unpacked if unpacked.exists() else shutil.which(name)
    if found is None:
        message = f"no {name}: run `make prometheus` (unpacks Debian's package under .venv/prometheus/)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return Path(found)


def _full_registry() -> CollectorRegistry:
    at = datetime.now(UTC) - timedelta(seconds=30)
    registry = build_registry(lambda: [_view("j1", report=_report(), last_checkpoint_at=at),
                                       _view("j2", JobState.PENDING)])
    http = HttpMetrics(registry)
    http.observe("GET", "/v1/jobs", 200, 0.01)
    return registry


def test_promtool_accepts_the_exposition(tmp_path: Path) -> None:
    promtool = _tool("promtool")
    out = subprocess.run([str(promtool), "check", "metrics"], input=generate_latest(_full_registry()),
                         capture_output=True, timeout=60)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), (out.stdout, out.stderr)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def exporter() -> Iterator[int]:
    """The registry served over HTTP on a free loopback port (the port)."""
    port = _free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=_full_registry())
    yield port
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _query(api: str, promql: str) -> list[dict[str, Any]]:
    url = f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def _wait_for(api: str, promql: str, process: subprocess.Popen[bytes], log: Path,
              deadline_s: float = 60.0) -> list[dict[str, Any]]:
    """The query's result once it has one (Prometheus scrapes every second)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"prometheus exited with {process.returncode}: {log.read_text()[-3000:]}")
        try:
            result = _query(api, promql)
            if result:
                return result
        except OSError:  # not listening yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"no result for {promql} after {deadline_s} s: {log.read_text()[-3000:]}")


@pytest.mark.slow
def test_a_real_prometheus_scrapes_the_metrics(exporter: int, tmp_path: Path) -> None:
    binary = _tool("prometheus")
    config = tmp_path / "prometheus.yml"
    # honor_labels: the metrics' own `job` label (the cicw job id) is kept, not renamed to
    # exported_job in favour of the scrape job's name (see the README).
    config.write_text(f"global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n"
                      f"scrape_configs:\n- job_name: cicw-stream\n  honor_labels: true\n"
                      f"  static_configs: [{{targets: ['127.0.0.1:{exporter}']}}]\n")
    port, log = _free_port(), tmp_path / "prometheus.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(binary), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                    f"--web.listen-address=127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}"
    try:
        trained = _wait_for(api, "cicw_records_trained_total", process, log)
        assert [(s["metric"]["job"], float(s["value"][1])) for s in trained] == [("j1", 1280.0)]
        # 15 steps: 4 in (5, 10] ms, 10 in (10, 25] ms, 1 above 10 s; the median (7.5th) lies in
        # (10, 25] ms, 3.5 of its 10 steps in: Prometheus interpolates linearly.
        median = _query(api, 'histogram_quantile(0.5, cicw_step_duration_seconds_bucket{job="j1"})')
        assert float(median[0]["value"][1]) == pytest.approx(0.010 + 0.015 * 3.5 / 10)
        low = _query(api, 'cicw_instance_weight_bucket{job="j1", le="0.25"}')
        assert float(low[0]["value"][1]) == 3.0
        lag = _query(api, 'cicw_consumer_lag_records{job="j1"}')
        assert {s["metric"]["partition"]: float(s["value"][1]) for s in lag} == {"0": 7.0, "2": 0.0}
        states = _query(api, "cicw_job_state == 1")
        assert {s["metric"]["job"]: s["metric"]["state"] for s in states} == {"j1": "RUNNING", "j2": "PENDING"}
        age = _query(api, 'cicw_checkpoint_age_seconds{job="j1"}')
        assert float(age[0]["value"][1]) >= 30.0
        requests = _query(api, 'cicw_http_requests_total{route="/v1/jobs"}')
        assert [(s["metric"]["method"], s["metric"]["status"], float(s["value"][1])) for s in requests] == [
            ("GET", "200", 1.0)]
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()



def test_suspect_counts_are_exported_per_job() -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from service.core.metrics import JobMetricsView, build_registry
    from service.jobs.schemas import JobState
    from workers.report import JobReport

    report = JobReport(step=9, examples=90, suspects_published=7, suspects_precision=0.857)
    registry = build_registry(lambda: [JobMetricsView("q", JobState.RUNNING, report, None)])
    samples = {s.name: s.value for f in text_string_to_metric_families(generate_latest(registry).decode())
               for s in f.samples if s.labels.get("job") == "q"}
    assert samples["cicw_suspects_published_total"] == 7
    assert samples["cicw_suspects_precision_ratio"] == 0.857
    assert "cicw_suspects_recall_ratio" not in samples  # undefined without clean labels: no sample, not NaN
