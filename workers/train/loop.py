"""The loop each Ray Train worker runs: Kafka partitions -> codec -> CICW step -> checkpoint.

:func:`train_loop_per_worker` reads as its steps: :func:`restore` the latest checkpoint (checked
against the spec), start a :class:`JobWorker` (learner, source, dead letters), and run it. Each
step, every rank decides alike what to do (:meth:`JobWorker.decide`, one all-reduce), trains
(:meth:`JobWorker.train`, through workers.train.step.Learner), reports, and when a checkpoint is
due (:meth:`JobWorker.checkpoint_due`) writes it (:meth:`JobWorker.checkpoint`); the last
checkpoint ends the run (:meth:`JobWorker.finish`), then :meth:`JobWorker.teardown`.

Order of durable steps at a checkpoint (kept in this order):
  1. every rank flushes its dead letters and suspect records (records the checkpoint counts as
     consumed are safe; while the broker cannot take them, the checkpoint is postponed, step by
     step; a record the broker refuses for good fails the job on every rank);
  2. rank 0 gathers every rank's next offsets and writes one checkpoint with the model state;
  3. ray.train.report persists it (Ray Train storage);
  4. only then rank 0 hands those offsets to a background committer for the consumer group
     cicw-<job> (for lag tools; the checkpoint, not the group, is the source of truth on resume,
     so a broker outage delays the commit but never training or a stop).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch.distributed as dist
from torch import Tensor

from cicw import CICWLoss, CICWOutput

from ..errors import DeadLettersPending, SourceStalledError
from ..kafka.codecs import DecodedBatch, decode_batch
from ..kafka.dead_letters import DeadLetterSink
from ..kafka.group_commits import GroupCommitter, confluent_committer
from ..kafka.prefetch import DecodedBatches
from ..kafka.records import ImageFormat, KafkaRecord
from ..kafka.source import KafkaSource
from ..report import CICWStepStats, JobReport
from ..spec import EvaluationSpec, JobSpec
from .checkpoint_meta import CheckpointMeta
from .checkpoints import load_state, save_state
from .collectives import DDP_OPTIONS, Collectives
from .control import StopWatch
from .decisions import DeadLetterStatus, StepDecision, StepSignals, first_refusal, refused_anywhere
from .evaluation import log_rejections, read_eval_set, score
from .label_quality import LabelWindow
from .metrics import MetricWindow, StepTimes, lag_from_vector, lag_vector
from .models import build_model
from .partitions import PartitionWatch
from .randomness import WorkerRandomness, seed_model_init
from .state import Counters, TrainState
from .step import Learner, StepResult, build_optimizer
from .suspects import SuspectPublisher

# While no rank has records, a stalled job still reports this often (the CLI shows the stall).
IDLE_REPORT_EVERY_S = 5.0
# How long a checkpoint waits for pending dead letters: briefly when periodic (if they are not
# delivered, the checkpoint is postponed to the next step), longer for the last one (a job
# ending with undelivered dead letters fails, without a checkpoint past them).
DLQ_PERIODIC_FLUSH_S = 1.0
DLQ_FINAL_FLUSH_S = 10.0
# How long the job's end waits for its last group commit (lag tools only; see group_commits).
COMMIT_CLOSE_TIMEOUT_S = 5.0
# Ray Train's controller takes one report per worker each time it polls the workers (every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default), and ray.train.report blocks until the
# previous report was taken. Reporting metrics through it every few steps held training to one
# report per poll (the demo's job: ~1,300 instead of ~6,300 records/s), and any report shortly
# before a checkpoint delays the checkpoint's. So reports reach the driver through the
# JobChannel, and Ray Train with every checkpoint (every N steps / T seconds, and the last),
# the only reports it must see.
log = logging.getLogger(__name__)

__all__ = ["JobWorker", "build_learner", "restore", "train_loop_per_worker"]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point on each worker. ``config``: ``spec`` (a JobSpec as JSON),
    ``channel`` (a workers.train.control.JobChannel actor, or None), ``model_packages``."""
    import ray.train
    import ray.train.torch

    spec = JobSpec.model_validate(config["spec"])
    ctx = ray.train.get_context()
    world = ctx.get_world_size()
    # Ray Train sets up a process group for one worker too; its all-reduces would cost a
    # single-worker job ~5% of its steps (measured with py-spy) for sums of one rank's values.
    collectives = Collectives(ray.train.torch.get_device(), world_size=world,
                              distributed=world > 1 and dist.is_available() and dist.is_initialized())
    state = restore(spec, ray.train.get_checkpoint())
    worker = JobWorker.start(spec, rank=ctx.get_world_rank(), collectives=collectives, state=state,
                             channel=config.get("channel"), model_packages=config.get("model_packages", ()))
    try:
        worker.run()
    finally:
        worker.teardown()


def restore(spec: JobSpec, checkpoint: Any) -> TrainState | None:
    """The state of Ray Train's latest checkpoint (None for a new job). Raises CheckpointError
    when it is unreadable, breaks an invariant, or was written for other data than ``spec``."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        state = load_state(directory)
    state.meta.check_resumable(spec)
    return state


def build_learner(spec: JobSpec, state: TrainState | None, *, rank: int, collectives: Collectives,
                  model_packages: Sequence[str] = ()) -> tuple[Learner, WorkerRandomness]:
    """The model (on the device, DDP-wrapped over several ranks), optimizer, LR schedule and CICW
    loss of ``spec``, continued from ``state``; and this rank's random generators."""
    import ray.train.torch

    seed_model_init(spec.seed)  # the same initial weights on every rank, and in every run of the spec
    model = build_model(spec.model.name, in_shape=spec.codec.input_shape, num_classes=spec.codec.num_classes,
                        allowed_packages=model_packages, **spec.model.options)
    if state is not None:
        model.load_state_dict(state.model)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=DDP_OPTIONS)
    optimizer, scheduler = build_optimizer(spec.optimizer, model.parameters())
    # Saved states continue the draws; without them (another world size) a resume at step k
    # gets streams of its own, not a replay of step 0's.
    randomness = WorkerRandomness.seeded(spec.seed, rank, collectives.device,
                                         step=0 if state is None else state.counters.step)
    saved = state.rng_for(rank, collectives.world_size) if state is not None else None
    if saved is not None:
        randomness.restore(saved)
    loss_fn = CICWLoss(spec.cicw, num_classes=spec.codec.num_classes, generator=randomness.mixup)
    if state is not None:
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        loss_fn.load_state_dict(state.loss)
    fmt = spec.codec.format
    augment = randomness.augment if isinstance(fmt, ImageFormat) and fmt.augment else None
    return Learner(model, optimizer, scheduler, loss_fn, collectives.device, collectives.world_size,
                   augment), randomness


def cicw_stats(out: CICWOutput, loss_fn: CICWLoss) -> CICWStepStats:
    """The CICW diagnostics of a step, as reported (synchronises with the device)."""
    d = out.diagnostics.as_dict()
    gap = loss_fn.gate.gap if loss_fn.gate is not None else None
    return CICWStepStats.model_validate({**d, "in_burn_in": bool(d["in_burn_in"]), "generalisation_gap": gap,
                                         "weights_from_step": loss_fn.schedule.weights_start})


@dataclass(frozen=True)
class EvalSet:
    """This rank's share of the clean evaluation set: x [n, *input_shape], y [n]."""

    spec: EvaluationSpec
    x: Tensor
    y: Tensor


def load_evaluation(spec: JobSpec, evaluation: EvaluationSpec, *, rank: int, world_size: int,
                    dead_letters: DeadLetterSink, resumed: bool) -> EvalSet:
    """This rank's share of the clean evaluation set. Its bad records are left out, logged, and
    sent to ``<eval_topic>.dlq`` by a new job only: a resumed job's earlier run sent them, and its
    first checkpoint's flush saw them delivered (each rank reads its own partitions: no repeats)."""
    read = read_eval_set(evaluation, spec.codec, spec.source, rank=rank, world_size=world_size)
    log_rejections(read.rejected)
    if not resumed:
        dead_letters.send(read.rejected)
    return EvalSet(evaluation, read.x, read.y)


@dataclass(frozen=True)
class Reporter:
    """Where reports go: every report to the JobChannel (rank 0 only, fire and forget: never
    wait on the driver); reports with a checkpoint to Ray Train too (every rank)."""

    channel: Any  # a JobChannel actor handle, or None
    rank: int

    def publish(self, report: JobReport) -> None:
        if self.channel is not None and self.rank == 0:
            self.channel.publish.remote(report)

    def persist(self, report: JobReport, directory: str | None) -> None:
        """Hand Ray Train the report and, on rank 0, the checkpoint written in ``directory``. The
        upload is synchronous; the local copy goes afterwards (jobs run for days)."""
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(directory) if directory is not None else None
        ray.train.report(report.model_dump(mode="json"), checkpoint=checkpoint,
                         delete_local_checkpoint_after_upload=checkpoint is not None)


class JobWorker:
    """One rank of a running job: its learner, feed, dead letters, counters and report window.
    Every method that runs a collective is called by every rank at the same point."""

    def __init__(self, spec: JobSpec, *, rank: int, collectives: Collectives, learner: Learner,
                 randomness: WorkerRandomness, state: TrainState | None, source: KafkaSource,
                 batches: DecodedBatches, dead_letters: DeadLetterSink, committer: GroupCommitter | None,
                 reporter: Reporter, stop_watch: StopWatch, eval_set: EvalSet | None,
                 record_log: IO[str] | None, suspects: SuspectPublisher | None = None) -> None:
        self.spec, self.rank, self.collectives = spec, rank, collectives
        self.learner, self.randomness = learner, randomness
        self.source, self.batches, self.dead_letters, self.committer = source, batches, dead_letters, committer
        self.reporter, self.stop_watch, self.eval_set, self.record_log = reporter, stop_watch, eval_set, record_log
        self.suspects = suspects
        # What a checkpoint waits for (Step 1): the dead letters, and the suspect records if any.
        self.sinks = [dead_letters] + ([suspects.sink] if suspects is not None else [])
        self.counters = copy.deepcopy(state.counters) if state is not None else Counters()
        self.resumed_offsets = state.offsets if state is not None else {}
        self.partition_count = max(state.meta.partition_count if state is not None else 0, source.partition_count)
        self.resumed_from = self.counters.step
        self.nothing = decode_batch([], spec.codec)
        self.window = MetricWindow()
        self.labels = LabelWindow(spec.codec.num_classes, spec.max_sources)  # this rank's, since the last report
        self.eval_accuracy: float | None = None  # the latest evaluation's, calibrates the noise estimates
        self.step_times = StepTimes()  # this run's, never reset (a Prometheus histogram)
        self.checkpoint_seconds: float | None = None  # the latest checkpoint write of this run
        self.last_checkpoint = self.last_idle_report = time.monotonic()
        self.checkpoint_owed = False  # a due checkpoint was postponed: try again at the next step
        self.stop_reason: str | None = None
        self.rows_since_norm_sync = 0  # rows this rank trained since BatchNorm statistics were merged
        # Partitions added to the topic are taken up at checkpoint boundaries (see partitions.py).
        refresh_s = spec.source.partition_refresh_s
        self.partition_watch = (PartitionWatch(source, refresh_s, self.partition_count)
                                if refresh_s is not None else None)

    @classmethod
    def start(cls, spec: JobSpec, *, rank: int, collectives: Collectives, state: TrainState | None,
              channel: Any = None, model_packages: Sequence[str] = ()) -> JobWorker:
        """Build the learner, read the evaluation set, start the source (at the checkpoint's
        offsets), open the dead-letter producer and, on rank 0, the group committer."""
        from confluent_kafka import Producer

        world = collectives.world_size
        learner, randomness = build_learner(spec, state, rank=rank, collectives=collectives,
                                            model_packages=model_packages)
        producer = Producer({"bootstrap.servers": spec.source.bootstrap_servers, **spec.source.client_config})
        dead_letters = DeadLetterSink(producer)
        # The suspects share the dead letters' producer: one connection per rank.
        suspects = (SuspectPublisher(spec.suspects, source_topic=spec.source.topic,
                                     burn_in_steps=spec.cicw.burn_in_steps, producer=producer)
                    if spec.suspects is not None else None)
        eval_set = (load_evaluation(spec, spec.evaluation, rank=rank, world_size=world, dead_letters=dead_letters,
                                    resumed=state is not None)
                    if spec.evaluation is not None else None)
        source = KafkaSource(spec.source, rank=rank, world_size=world, group_id=spec.consumer_group,
                             resume_offsets=state.offsets if state is not None else None).start()
        batches = DecodedBatches(source, spec.codec)  # decodes the next batch while a step runs
        client_config: dict[str, object] = dict(spec.source.client_config)
        committer = (confluent_committer(spec.source.topic, spec.source.bootstrap_servers, spec.consumer_group,
                                         client_config) if rank == 0 else None)
        record_log = None
        if spec.record_log_dir is not None:
            Path(spec.record_log_dir).mkdir(parents=True, exist_ok=True)
            record_log = open(Path(spec.record_log_dir) / f"rank{rank}.jsonl", "a")  # noqa: SIM115 - teardown closes
        return cls(spec, rank=rank, collectives=collectives, learner=learner, randomness=randomness, state=state,
                   source=source, batches=batches, dead_letters=dead_letters, committer=committer,
                   reporter=Reporter(channel, rank), stop_watch=StopWatch(channel if rank == 0 else None),
                   eval_set=eval_set, record_log=record_log, suspects=suspects)

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        """Train until the source is done, max_steps, or a stop request; then the last checkpoint."""
        while self.spec.max_steps is None or self.counters.step < self.spec.max_steps:
            ready = self.batches.next()
            records, batch = (ready.records, ready.decoded) if ready is not None else (None, self.nothing)
            self.dead_letters.send(batch.rejected)
            decision = self.decide(batch, source_open=ready is not None)
            self.counters.rejected += decision.rejected
            self.fail_if_unhealthy(decision)
            if decision.stop:
                # The records fetched above count as consumed in the stop's checkpoint, so this
                # step still trains them; the loop ends after it.
                self.stop_reason = self.stop_watch.reason or "stop requested"
            if decision.examples == 0 and (decision.done or self.stop_reason):
                break
            if decision.examples == 0:
                self.report_idle(decision)  # caught up (or stalled): a step with none anywhere is skipped
                continue
            result = self.train(records, batch, decision)
            self.after_step(result, decision)
            if self.stop_reason:
                break
        self.finish()

    def decide(self, batch: DecodedBatch, *, source_open: bool) -> StepDecision:
        """One collective decides, for every rank alike, whether the stream is done, how many
        examples this step has, and the time- and event-driven triggers (see decisions.py)."""
        now = time.monotonic()
        every_s, deadline = self.spec.checkpoint.every_s, self.spec.source.stall_deadline_s
        stalled_s = self.source.stalled_for()
        return StepDecision.agree(self.collectives, StepSignals(
            examples=len(batch), source_open=source_open, rejected=len(batch.rejected),
            checkpoint_time_due=every_s is not None and now - self.last_checkpoint >= every_s,
            stalled=stalled_s > 0, past_deadline=deadline is not None and stalled_s > deadline,
            stop=self.stop_watch.poll() is not None, idle_report_due=now - self.last_idle_report >= IDLE_REPORT_EVERY_S,
            dead_letters_refused=first_refusal(self.sinks) is not None))

    def fail_if_unhealthy(self, decision: StepDecision) -> None:
        """Fail on every rank, with the reason, when some rank's broker refused a dead letter or a
        suspect record, or stayed unreachable past the deadline."""
        if decision.dead_letters_refused:
            DeadLetterStatus(refused=refused_anywhere(self.collectives, first_refusal(self.sinks))).raise_if_refused()
        if decision.past_deadline:
            stalled_s = self.source.stalled_for()
            why = (f"broker unreachable for {stalled_s:.0f} s: {self.source.trouble}" if stalled_s
                   else "another rank's broker connection stalled")
            raise SourceStalledError(f"{why} (past source.stall_deadline_s={self.spec.source.stall_deadline_s})")

    def report_idle(self, decision: StepDecision) -> None:
        """While no rank has records: report the steps not reported yet at once, so watchers see
        exact counts, then a heartbeat (with the stall, if any) every few seconds."""
        if not (self.window.steps or decision.idle_report_due):
            return
        fields = self.window_fields()
        if decision.stalled:
            fields.update(stalled_s=self.collectives.max(self.source.stalled_for()),
                          stall_reason=self.source.trouble or "another rank's broker is unreachable")
        self.reporter.publish(JobReport(**fields))
        self.window, self.last_idle_report = MetricWindow(), time.monotonic()

    def train(self, records: Sequence[KafkaRecord] | None, batch: DecodedBatch, decision: StepDecision) -> StepResult:
        """One optimizer step on this rank's batch; counters, metric window, step time and record log."""
        started = time.perf_counter()
        result = self.learner.step(batch.inputs, batch.targets)
        self.rows_since_norm_sync += len(batch)
        self.counters.step += 1
        self.counters.examples += decision.examples
        self.window.observe(loss=result.out.loss, targets=result.targets, clean_labels=batch.clean_labels,
                            logits=result.out.logits, weights=result.judged_weights,
                            global_examples=decision.examples, weights_active=result.weights_active)
        self.labels.observe(sources=batch.sources, targets=result.targets, clean_labels=batch.clean_labels,
                            logits=result.out.logits, weights=result.judged_weights,
                            global_examples=decision.examples, weights_active=result.weights_active)
        if self.suspects is not None:
            self.suspects.observe(step=self.counters.step, records=records, batch=batch, targets=result.targets,
                                  logits=result.out.logits, weights=result.judged_weights,
                                  global_examples=decision.examples, weights_active=result.weights_active)
        # Timed past observe(), which reads the loss back: on a GPU the step's kernels have run
        # by then, so this is the step's time, not the time to launch it.
        self.step_times.observe(time.perf_counter() - started)
        if self.record_log is not None:
            trained = [[r.partition, r.offset] for r in (records or [])
                       if all(r is not rej.record for rej in batch.rejected)]
            self.record_log.write(json.dumps({"pid": os.getpid(), "resumed_from": self.resumed_from,
                                              "step": self.counters.step, "records": trained}) + "\n")
            self.record_log.flush()
        return result

    def checkpoint_due(self, decision: StepDecision) -> bool:
        """After a step: a postponed checkpoint, checkpoint.every_s on any rank's clock, or
        checkpoint.every_steps."""
        every = self.spec.checkpoint.every_steps
        return (self.checkpoint_owed or decision.checkpoint_time_due
                or (every is not None and self.counters.step % every == 0))

    def after_step(self, result: StepResult, decision: StepDecision) -> None:
        """Report every report_every_steps, evaluate every evaluation.every_steps, checkpoint when due."""
        step, evaluation = self.counters.step, self.spec.evaluation
        due = self.checkpoint_due(decision)
        eval_due = evaluation is not None and step % evaluation.every_steps == 0
        if not (step % self.spec.report_every_steps == 0 or due or eval_due):
            return
        fields = {**self.window_fields(), "cicw": cicw_stats(result.out, self.learner.loss_fn)}
        if eval_due:
            fields.update(self.evaluate())
        self.window, self.last_idle_report = MetricWindow(), time.monotonic()
        if not due:
            self.reporter.publish(JobReport(**fields))
            return
        self.checkpoint_owed = not self.checkpoint(fields)  # postponed: tried again at the next step
        if not self.checkpoint_owed:
            self.last_checkpoint = time.monotonic()

    def finish(self) -> None:
        """The last report, with the evaluation and the stop's reason, and the last checkpoint."""
        fields = {**self.window_fields(), "final": True, "stopped": self.stop_reason}
        if self.eval_set is not None:
            fields.update(self.evaluate())
        self.checkpoint(fields, final=True)

    # -- reports --------------------------------------------------------------------------------

    def window_fields(self) -> dict[str, Any]:
        """Counters plus the metrics of the steps since the last report, over all ranks (two
        all-reduces and, for the label quality per source, one all-gather); adds the window's
        noise detection and label quality to the job's totals."""
        mine, lag = self.window.sums(), self.source.lag_by_partition()
        suspects = self.suspects.take_window() if self.suspects is not None else [0, 0, 0, 0]
        size = self.lag_vector_size(lag)
        summed = self.collectives.sum([*mine, *suspects, len(self.source.offset_resets), *lag_vector(lag, size)])
        sums, summed = summed[:len(mine)], summed[len(mine):]
        suspect_sums, summed = summed[:len(suspects)], summed[len(suspects):]
        resets, per_partition = summed[0], lag_from_vector(summed[1:])
        self.counters.noise.add(sums)
        self.counters.suspects.add(suspect_sums)
        # Each rank's sources differ: their windows are merged by name, in rank order, on every rank.
        self.counters.labels.merge(self.collectives.gather(self.labels.as_rows()), max_sources=self.spec.max_sources)
        self.labels = LabelWindow(self.spec.codec.num_classes, self.spec.max_sources)
        c = self.counters
        return {"step": c.step, "examples": c.examples, "rejected": c.rejected, "stalled_s": 0.0,
                "lag": sum(per_partition.values()), "lag_per_partition": per_partition,
                "offset_resets": int(resets), "checkpoint_seconds": self.checkpoint_seconds,
                **self.step_times.fields(), **self.window.summary(sums, c.noise),
                **c.labels.report(self.spec.codec.num_classes, self.eval_accuracy), **c.suspects.report()}

    def lag_vector_size(self, lag: dict[int, int]) -> int:
        """The size of the per-partition lag vector, the same on every rank (one all-reduce): each
        rank read the topic's metadata on its own at start, so until the first checkpoint their
        partition counts can differ."""
        return int(self.collectives.max(float(max(self.partition_count, max(lag, default=-1) + 1))))

    def evaluate(self) -> dict[str, Any]:
        """Accuracy and loss on the clean evaluation set, summed over every rank's share."""
        assert self.eval_set is not None  # finish() and after_step() check the spec
        self.sync_norm_buffers()  # every rank scores with the same statistics
        ev = self.eval_set
        # The model without DDP: no collectives in evaluation.
        correct, loss_sum = score(self.learner.raw_model, ev.x, ev.y, batch_size=ev.spec.batch_size,
                                  device=self.collectives.device)
        correct, loss_sum, n = self.collectives.sum([correct, loss_sum, len(ev.y)])
        self.eval_accuracy = correct / n if n else None
        return {"eval_accuracy": correct / n if n else float("nan"),
                "eval_loss": loss_sum / n if n else float("nan"), "eval_examples": int(n)}

    def sync_norm_buffers(self) -> None:
        """Merge the ranks' BatchNorm running statistics (see collectives.py)."""
        self.collectives.average_norm_buffers(self.learner.raw_model, self.rows_since_norm_sync)
        self.rows_since_norm_sync = 0

    # -- checkpoints ----------------------------------------------------------------------------

    def checkpoint(self, fields: dict[str, Any], *, final: bool = False) -> bool:
        """Write a checkpoint (Steps 1-4 of the module docstring) with the report ``fields``.
        False when it was postponed: some rank's dead letters or suspect records are not delivered
        yet (broker unreachable), and a checkpoint past them could lose them."""
        started = time.perf_counter()
        dead_letters = DeadLetterStatus.after_flush(  # Step 1
            self.sinks, DLQ_FINAL_FLUSH_S if final else DLQ_PERIODIC_FLUSH_S).agree(self.collectives)
        dead_letters.raise_if_refused()
        if dead_letters.pending is not None:
            if final:
                raise DeadLettersPending(f"{dead_letters.pending}; no checkpoint written, so a rerun retrains from "
                                         "the last one and routes these records again")
            self.reporter.publish(JobReport(**fields, checkpoint_postponed=dead_letters.pending))
            return False
        if self.partition_watch is not None:
            self.partition_count = max(self.partition_count, self.partition_watch.at_checkpoint(self.collectives))
        self.sync_norm_buffers()
        offsets, rng = self.gather_positions()
        self.partition_count = max(self.partition_count, max(offsets, default=-1) + 1)
        directory = self.write_checkpoint(offsets, rng) if self.rank == 0 else None  # Step 2
        # Steps 1-2: the report goes to Ray Train with the checkpoint, before the upload is timed.
        self.checkpoint_seconds = time.perf_counter() - started
        report = JobReport(**{**fields, "checkpoint_seconds": self.checkpoint_seconds},
                           checkpoint_step=self.counters.step, offsets=offsets)
        self.reporter.persist(report, directory)  # Step 3
        self.reporter.publish(report)
        if self.committer is not None and offsets:  # Step 4, in the background: never blocks training
            self.committer.submit(offsets)
        return True

    def gather_positions(self) -> tuple[dict[int, int], list[dict[str, Tensor]]]:
        """Every partition's next offset after the batches trained (not those decoded ahead),
        and each rank's generator states, in rank order (one all-gather)."""
        gathered = self.collectives.gather((dict(self.batches.positions), self.randomness.state()))
        offsets = {**self.resumed_offsets, **{p: o for positions, _ in gathered for p, o in positions.items()}}
        return dict(sorted(offsets.items())), [rng for _, rng in gathered]

    def write_checkpoint(self, offsets: dict[int, int], rng: list[dict[str, Tensor]]) -> str:
        """Rank 0: the checkpoint directory (state.pt and meta.json) of the state now."""
        c = self.counters
        meta = CheckpointMeta.for_spec(self.spec, partition_count=self.partition_count, step=c.step,
                                       examples=c.examples, offsets=offsets)
        directory = tempfile.mkdtemp(prefix="cicw-ckpt-")
        save_state(directory, TrainState(meta=meta, **self.learner.state_dicts(), counters=copy.deepcopy(c), rng=rng))
        return directory

    # -- teardown -------------------------------------------------------------------------------

    def teardown(self) -> None:
        """Stop decoding and polling, wait briefly for the last group commit, close the record log."""
        self.batches.close()
        self.source.close()
        committer = self.committer
        if committer is not None and not committer.close(timeout_s=COMMIT_CLOSE_TIMEOUT_S):
            log.warning("the last checkpoint's offsets did not reach consumer group %s (%s; last committed: %s); "
                        "the checkpoint holds them", self.spec.consumer_group,
                        committer.last_error or "broker not answering", committer.committed)
        if self.record_log is not None:
            self.record_log.close()
