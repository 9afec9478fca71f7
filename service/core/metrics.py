"""Prometheus metrics of the service: every job's latest report as metric families built at scrape
time (:class:`JobCollector`), and the API's own requests (:class:`HttpMetrics`).

Each name, its labels, unit and meaning are listed in the README (section "Prometheus metrics").
Names start with ``cicw_`` and carry base units (seconds; ratios in 0..1); label values are
bounded (a job id, a partition, a class index, a route template; never a record or a raw path).
A value a report leaves undefined (None: no clean labels, no step yet) is left out, never NaN.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from cicw.config import WEIGHT_HISTOGRAM_EDGES
from workers.report import STEP_SECONDS_EDGES, JobReport, SourceQuality

from ..jobs.schemas import JobState

__all__ = ["HTTP_SECONDS_EDGES", "HttpMetrics", "JobCollector", "JobMetricsView", "build_registry"]

# Request latency buckets (seconds): the default ones of prometheus_client up to 10 s, then 30 s
# and 60 s for checkpoint and model downloads.
HTTP_SECONDS_EDGES = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# The method label takes these values; any other method a client sends counts as "other", so a
# client cannot grow the label set.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass(frozen=True)
class JobMetricsView:
    """What the metrics of one job are built from: its state, its latest report (None before the
    workers' first), and when its latest durable checkpoint was written (None: none yet; a naive
    datetime is read as UTC, as SQLite hands back what was stored in UTC)."""

    job_id: str
    state: JobState
    report: JobReport | None
    last_checkpoint_at: datetime | None


@dataclass(frozen=True)
class _Scalar:
    """A metric with one sample per job (label ``job``), read from the job's latest report."""

    name: str
    doc: str
    value: Callable[[JobReport], float | None]
    kind: Literal["counter", "gauge"] = "gauge"
    unit: str = ""

    def family(self, views: Sequence[JobMetricsView]) -> Metric:
        cls = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        family = cls(self.name, self.doc, labels=["job"], unit=self.unit)
        for view in views:
            value = self.value(view.report) if view.report is not None else None
            if value is not None:
                family.add_metric([view.job_id], value)
        return family


_SCALARS = (
    _Scalar("cicw_records_trained", "Records trained into the model (job total over its runs).",
            lambda r: r.examples, kind="counter"),
    _Scalar("cicw_records_rejected", "Records sent to the dead-letter topic (job total over its runs).",
            lambda r: r.rejected, kind="counter"),
    _Scalar("cicw_optimizer_steps", "Optimizer steps taken (job total over its runs).",
            lambda r: r.step, kind="counter"),
    _Scalar("cicw_loss", "Mean weighted training loss of the job's method over the steps of the latest report.",
            lambda r: r.loss),
    _Scalar("cicw_prequential_accuracy", "Accuracy on each batch before training on it, against the given "
                                         "labels, over the steps of the latest report.",
            lambda r: r.prequential_accuracy, unit="ratio"),
    _Scalar("cicw_eval_accuracy", "Accuracy on the clean evaluation set at the latest evaluation.",
            lambda r: r.eval_accuracy, unit="ratio"),
    _Scalar("cicw_records_per_second", "Records trained per second over the steps of the latest report.",
            lambda r: r.records_per_s),
    _Scalar("cicw_checkpoint_duration", "Wall time rank 0 took to write the latest checkpoint of the workers' "
                                        "current run (upload to checkpoint storage not included).",
            lambda r: r.checkpoint_seconds, unit="seconds"),
    _Scalar("cicw_effective_sample_size", "Effective sample size 1/sum(w^2) of the instance weights on the "
                                          "latest reported step (examples; the batch size when uniform).",
            lambda r: r.cicw.ess if r.cicw is not None else None),
    _Scalar("cicw_weights_in_loss", "1 once the instance weights (and weighted mixup) are in the loss, 0 while "
                                    "the job trains like cross entropy (burn-in, or the memorization gate shut).",
            lambda r: (0.0 if r.cicw.in_burn_in else 1.0) if r.cicw is not None else None),
    _Scalar("cicw_generalisation_gap", "Memorization gate: mean cross entropy of held-out examples minus that of "
                                       "trained-on ones, in nats (the gate opens when it is significant).",
            lambda r: r.cicw.generalisation_gap if r.cicw is not None else None),
    _Scalar("cicw_down_weighted", "Fraction of the latest reported step's examples with N*w < 1/4.",
            lambda r: r.cicw.low_weight_fraction if r.cicw is not None else None, unit="ratio"),
    _Scalar("cicw_class_weight_mass_moved", "Mean label mass the class weights moved off the given label on the "
                                            "latest reported step.",
            lambda r: r.cicw.class_mass_moved if r.cicw is not None else None, unit="ratio"),
    _Scalar("cicw_noise_precision", "Of the down-weighted examples with a clean-label header, the fraction "
                                    "whose given label was wrong (cumulative).",
            lambda r: r.noise_precision, unit="ratio"),
    _Scalar("cicw_noise_recall", "Of the examples whose given label was wrong (clean-label header differs), "
                                 "the fraction down-weighted (cumulative).",
            lambda r: r.noise_recall, unit="ratio"),
    _Scalar("cicw_suspects_published", "Records published to the suspects topic for review (job total).",
            lambda r: r.suspects_published, kind="counter"),
    _Scalar("cicw_suspects_precision", "Of the published suspects with a clean-label header, the fraction whose "
                                       "given label was wrong (cumulative).",
            lambda r: r.suspects_precision, unit="ratio"),
    _Scalar("cicw_suspects_recall", "Of the wrong labels trained while suspects were published, the fraction "
                                    "published (cumulative).",
            lambda r: r.suspects_recall, unit="ratio"),
)


def _lag(views: Sequence[JobMetricsView]) -> Metric:
    family = GaugeMetricFamily("cicw_consumer_lag_records", "Records on a partition of the job's topic not yet "
                               "read, by the last known end offset.", labels=["job", "partition"])
    for view in views:
        for partition, records in sorted((view.report.lag_per_partition if view.report else {}).items()):
            family.add_metric([view.job_id, str(partition)], records)
    return family


def _class_mean_weight(views: Sequence[JobMetricsView]) -> Metric:
    family = GaugeMetricFamily("cicw_class_mean_weight", "Mean N*w of the latest reported step's examples with "
                               "this given label (1 = uniform; well under 1: a class whose labels look noisy).",
                               labels=["job", "class"])
    for view in views:
        stats = view.report.cicw if view.report is not None else None
        for label, weight in enumerate(stats.class_mean_weight if stats is not None else ()):
            if weight is not None:  # the label was absent from the step's batch
                family.add_metric([view.job_id, str(label)], weight)
    return family


@dataclass(frozen=True)
class _PerSource:
    """A metric with one sample per job and source (labels ``job``, ``source``), from the latest
    report's label quality per source (at most the job's max_sources names plus "other")."""

    name: str
    doc: str
    value: Callable[[SourceQuality], float | None]
    kind: Literal["counter", "gauge"] = "gauge"
    unit: str = ""

    def family(self, views: Sequence[JobMetricsView]) -> Metric:
        cls = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        family = cls(self.name, self.doc, labels=["job", "source"], unit=self.unit)
        for view in views:
            for source in view.report.sources if view.report is not None else ():
                value = self.value(source)
                if value is not None:
                    family.add_metric([view.job_id, source.source], value)
        return family


_PER_SOURCE = (
    _PerSource("cicw_source_records", "Records trained from this source (job total; \"other\": the sources past "
                                      "the job's max_sources largest).", lambda q: q.records, kind="counter"),
    _PerSource("cicw_source_mean_weight", "Mean N*w of this source's records trained after burn-in (1 = uniform).",
               lambda q: q.mean_weight),
    _PerSource("cicw_source_down_weighted", "Fraction of this source's records trained after burn-in with N*w < 1/4.",
               lambda q: q.down_weighted_fraction, unit="ratio"),
    _PerSource("cicw_source_estimated_noise", "Estimated fraction of wrong given labels from this source (model "
                                              "disagreement corrected by the model's error).",
               lambda q: q.estimated_noise, unit="ratio"),
    _PerSource("cicw_source_true_noise", "Of this source's records with a clean-label header, the fraction given a "
                                         "wrong label.", lambda q: q.true_noise, unit="ratio"),
)


def _cumulative(counts: Sequence[float], upper_edges: Sequence[float]) -> list[tuple[str, float]]:
    """Prometheus ``le`` buckets from counts per bin: ``upper_edges`` ends with +Inf."""
    out, total = [], 0.0
    for count, edge in zip(counts, upper_edges, strict=True):
        total += count
        out.append((floatToGoString(edge), total))
    return out


def _step_duration(views: Sequence[JobMetricsView]) -> Metric:
    family = HistogramMetricFamily("cicw_step_duration_seconds", "Wall time of rank 0's optimizer steps since "
                                   "the job's workers (re)started.", labels=["job"])
    edges = (*STEP_SECONDS_EDGES, float("inf"))
    for view in views:
        r = view.report
        if r is not None and r.step_seconds_buckets:  # empty in reports of older workers
            family.add_metric([view.job_id], _cumulative(r.step_seconds_buckets, edges), r.step_seconds_sum)
    return family


def _instance_weight(views: Sequence[JobMetricsView]) -> Metric:
    family = GaugeHistogramMetricFamily(
        "cicw_instance_weight", "Instance weights N*w of the latest reported step's examples (1 = uniform). cicw's "
        "bins are [a, b): bucket le=b counts N*w < b.", labels=["job"])
    for view in views:
        stats = view.report.cicw if view.report is not None else None
        if stats is not None and stats.weight_histogram:
            # The weights of a global batch sum to 1, so the N*w of its N examples sum to N.
            family.add_metric([view.job_id], _cumulative(stats.weight_histogram, WEIGHT_HISTOGRAM_EDGES[1:]),
                              stats.num_examples)
    return family


def _checkpoint_age(views: Sequence[JobMetricsView], now: float) -> Metric:
    family = GaugeMetricFamily("cicw_checkpoint_age_seconds", "Seconds since the job's latest durable "
                               "checkpoint was written.", labels=["job"])
    for view in views:
        at = view.last_checkpoint_at
        if at is not None:
            at = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
            # Never negative: the checkpoint's time may come from a host whose clock runs ahead.
            family.add_metric([view.job_id], max(now - at.timestamp(), 0.0))
    return family


def _state(views: Sequence[JobMetricsView]) -> Metric:
    family = GaugeMetricFamily("cicw_job_state", "1 for the job's current state, 0 for the others.",
                               labels=["job", "state"])
    for view in views:
        for state in JobState:
            family.add_metric([view.job_id, state.value], 1.0 if view.state == state else 0.0)
    return family


class JobCollector(Collector):
    """Every job's metrics, built at each scrape from ``jobs()`` (the store's latest report of
    each job); ``clock`` gives the time now (Unix seconds), for the checkpoint age."""

    def __init__(self, jobs: Callable[[], Iterable[JobMetricsView]], *,
                 clock: Callable[[], float] = time.time) -> None:
        self._jobs, self._clock = jobs, clock

    def collect(self) -> Iterable[Metric]:
        """The metric families of every job ``jobs()`` returns now."""
        return list(self._families(list(self._jobs()), self._clock()))

    def describe(self) -> Iterable[Metric]:
        """The families without samples: the registry checks names for clashes with this, instead
        of scraping the store when the collector is registered."""
        return list(self._families([], 0.0))

    @staticmethod
    def _families(views: Sequence[JobMetricsView], now: float) -> Iterator[Metric]:
        for scalar in _SCALARS:
            yield scalar.family(views)
        yield _lag(views)
        yield _class_mean_weight(views)
        for per_source in _PER_SOURCE:
            yield per_source.family(views)
        yield _step_duration(views)
        yield _instance_weight(views)
        yield _checkpoint_age(views, now)
        yield _state(views)


def build_registry(jobs: Callable[[], Iterable[JobMetricsView]], *,
                   clock: Callable[[], float] = time.time) -> CollectorRegistry:
    """A fresh registry holding a :class:`JobCollector` over ``jobs``; the service adds its
    request metrics to it with ``HttpMetrics(registry)``. Nothing goes to prometheus_client's
    global registry, so each app (and each test) has its own."""
    registry = CollectorRegistry()
    registry.register(JobCollector(jobs, clock=clock))
    return registry


class HttpMetrics:
    """The API's requests, registered on ``registry``: a counter by method, route template and
    status, and a latency histogram by method and route template."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._requests = Counter("cicw_http_requests", "HTTP requests answered, by method, route template and "
                                 "status code.", ["method", "route", "status"], registry=registry)
        self._seconds = Histogram("cicw_http_request_duration_seconds", "Time to answer an HTTP request, by "
                                  "method and route template.", ["method", "route"], registry=registry,
                                  buckets=HTTP_SECONDS_EDGES)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one request. ``route`` must be the route's template (``/v1/jobs/{job_id}``),
        never the raw path: a label value per job id or typo would grow without bound. The caller
        leaves out health probes and the metrics endpoint."""
        method = method.upper() if method.upper() in _METHODS else "other"
        self._requests.labels(method, route, str(status)).inc()
        self._seconds.labels(method, route).observe(seconds)
