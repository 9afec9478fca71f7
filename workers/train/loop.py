"""The loop each Ray Train worker runs: Kafka partitions -> codec -> CICW step -> checkpoint.

Order of durable steps at a checkpoint (kept in this order):
  1. every rank flushes its dead letters (records the checkpoint counts as consumed are safe;
     while the broker cannot take them, the checkpoint is postponed, step by step);
  2. rank 0 gathers every rank's next offsets and writes one checkpoint with the model state;
  3. ray.train.report persists it (Ray Train storage);
  4. only then rank 0 hands those offsets to a background committer for the consumer group
     cicw-<job> (for lag tools; the checkpoint, not the group, is the source of truth on resume,
     so a broker outage delays the commit but never training or a stop).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cicw import CICWLoss

from .augment import pad_crop_flip
from .checkpoints import load_state, save_state
from ..kafka.codecs import decode_batch
from .control import StopWatch
from ..kafka.dead_letters import DeadLetterSink, DeadLettersPending
from .evaluation import load_eval_set, score
from ..kafka.group_commits import confluent_committer
from ..spec import JobSpec, OptimizerSpec
from .models import build_model
from ..kafka.prefetch import DecodedBatches
from .randomness import WorkerRandomness, seed_model_init
from ..kafka.records import ImageFormat
from ..kafka.source import KafkaSource
from .metrics import MetricWindow
from ..errors import SourceStalledError
from ..report import CICWStepStats, JobReport

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
# before a checkpoint delays the checkpoint's. So metrics reach the driver through the
# JobChannel at every report, and Ray Train with every checkpoint (every N steps / T seconds,
# and the last), the only reports it must see.
log = logging.getLogger(__name__)


def as_report(metrics: dict[str, Any]) -> JobReport:
    """The typed report of a metrics dict; ``cicw_*`` keys become its CICWStepStats."""
    cicw = {k.removeprefix("cicw_"): v for k, v in metrics.items() if k.startswith("cicw_")}
    rest = {k: v for k, v in metrics.items() if not k.startswith("cicw_")}
    if cicw:
        cicw["in_burn_in"] = bool(cicw.get("in_burn_in", False))
        rest["cicw"] = CICWStepStats(**cicw)
    return JobReport(**rest)


def build_optimizer(spec: OptimizerSpec, params: Iterable[torch.nn.Parameter],
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.MultiStepLR]:
    """The optimizer and its step-wise LR schedule that a job spec names."""
    optimizer: torch.optim.Optimizer
    if spec.name == "sgd":
        optimizer = torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum,
                                    nesterov=spec.nesterov and spec.momentum > 0, weight_decay=spec.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=spec.lr_milestones,
                                                           gamma=spec.lr_gamma)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from confluent_kafka import Producer

    spec = JobSpec.model_validate(config["spec"])
    channel = config.get("channel")  # a workers.train.control.JobChannel actor, or None
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    distributed = dist.is_available() and dist.is_initialized()

    state: dict[str, Any] | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_state(d)

    seed_model_init(spec.seed)  # the same initial weights on every rank, and in every run of the spec
    model = build_model(spec.model.name, in_shape=spec.codec.input_shape, num_classes=spec.codec.num_classes,
                        allowed_packages=config.get("model_packages", ()), **spec.model.options)
    if state is not None:
        model.load_state_dict(state["model"])
    model = ray.train.torch.prepare_model(model)  # DDP when world > 1; moves to the device
    optimizer, scheduler = build_optimizer(spec.optimizer, model.parameters())
    saved_rng = (state or {}).get("rng") or []
    # Saved states continue the draws; without them (another world size) a resume at step k
    # gets streams of its own, not a replay of step 0's.
    randomness = WorkerRandomness.seeded(spec.seed, rank, device,
                                         step=0 if state is None else int(state["counters"]["step"]))
    if len(saved_rng) == world:
        randomness.restore(saved_rng[rank])
    loss_fn = CICWLoss(spec.cicw, num_classes=spec.codec.num_classes, generator=randomness.mixup)
    counters = {"step": 0, "examples": 0, "rejected": 0, "noise_down": 0, "noise_corrupted": 0, "noise_hit": 0}
    offsets: dict[int, int] = {}
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loss_fn.load_state_dict(state["loss"])
        counters.update(state["counters"])
        offsets = {int(p): int(o) for p, o in state["offsets"].items()}

    eval_set = (load_eval_set(spec.evaluation, spec.codec, spec.source, rank=rank, world_size=world)
                if spec.evaluation is not None else None)
    source = KafkaSource(spec.source, rank=rank, world_size=world, group_id=spec.consumer_group,
                         resume_offsets=offsets).start()
    batches = DecodedBatches(source, spec.codec)  # decodes the next batch while a step runs
    nothing = decode_batch([], spec.codec)
    stop_watch = StopWatch(channel if rank == 0 else None)
    augment = isinstance(spec.codec.format, ImageFormat) and spec.codec.format.augment
    dlq = DeadLetterSink(Producer({"bootstrap.servers": spec.source.bootstrap_servers,
                                   **spec.source.client_config}))
    committer = (confluent_committer(spec.source.topic, spec.source.bootstrap_servers, spec.consumer_group,
                                     spec.source.client_config) if rank == 0 else None)

    def all_ranks_sum(values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if distributed:
            dist.all_reduce(t)
        return t.tolist()

    def save_and_report(metrics: dict[str, Any], *, final: bool = False) -> bool:
        """Write a checkpoint (Steps 1-4); False when it was postponed: some rank's dead letters
        are not delivered yet (broker unreachable), and a checkpoint past them could lose them."""
        try:  # Step 1
            dlq.flush(DLQ_FINAL_FLUSH_S if final else DLQ_PERIODIC_FLUSH_S)
            undelivered = None
        except DeadLettersPending as exc:
            undelivered = str(exc)
        if all_ranks_sum([float(undelivered is not None)])[0]:  # every rank decides alike
            why = undelivered or "another rank's dead letters are not delivered"
            if final:
                raise DeadLettersPending(f"{why}; no checkpoint written, so a rerun retrains from the last "
                                         "one and routes these records again")
            publish({**metrics, "checkpoint_postponed": why})
            return False
        # Offsets after the batches trained, not those decoded ahead; and each rank's RNG states.
        mine = (dict(batches.positions), randomness.state())
        gathered: list[Any] = [mine]
        if distributed:
            gathered = [None] * world
            dist.all_gather_object(gathered, mine)
        all_offsets = {**offsets, **{p: o for positions, _ in gathered for p, o in positions.items()}}
        ckpt = None
        if rank == 0:  # Step 2
            directory = tempfile.mkdtemp(prefix="cicw-ckpt-")
            raw_model = model.module if hasattr(model, "module") else model
            save_state(directory, {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "scheduler": scheduler.state_dict(), "loss": loss_fn.state_dict(),
                                   "counters": dict(counters), "offsets": all_offsets,
                                   "rng": [rng for _, rng in gathered],
                                   "topic": spec.source.topic, "job_id": spec.job_id})
            ckpt = ray.train.Checkpoint.from_directory(directory)
        # Step 3. The upload is synchronous; the local copy goes afterwards (jobs run for days).
        durable = as_report({**metrics, "offsets": dict(sorted(all_offsets.items()))})
        ray.train.report(durable.model_dump(mode="json"), checkpoint=ckpt,
                         delete_local_checkpoint_after_upload=ckpt is not None)
        publish({**metrics, "checkpoint_step": counters["step"]})
        if committer is not None and all_offsets:  # Step 4, in the background: never blocks training
            committer.submit(all_offsets)
        return True

    def publish(metrics: dict[str, Any]) -> None:
        if channel is not None and rank == 0:
            channel.publish.remote(as_report(metrics))  # fire and forget: never wait on the driver

    def window_metrics(w: MetricWindow) -> dict[str, Any]:
        """Counters plus the metrics of the steps since the last report, over all ranks."""
        *sums, lag = all_ranks_sum([*w.sums(), source.lag()])
        return {"step": counters["step"], "examples": counters["examples"], "rejected": counters["rejected"],
                "lag": int(lag), "stalled_s": 0.0, **w.summary(sums, counters)}

    record_log = None
    if spec.record_log_dir is not None:
        Path(spec.record_log_dir).mkdir(parents=True, exist_ok=True)
        record_log = open(Path(spec.record_log_dir) / f"rank{rank}.jsonl", "a")  # noqa: SIM115 - closed below
    resumed_from = counters["step"]
    last_checkpoint = time.monotonic()
    checkpoint_owed = False

    def evaluate() -> dict[str, float]:
        assert eval_set is not None and spec.evaluation is not None
        raw_model = model.module if hasattr(model, "module") else model  # no DDP collectives in eval
        correct, loss_sum = score(raw_model, *eval_set, batch_size=spec.evaluation.batch_size, device=device)
        correct, loss_sum, n = all_ranks_sum([correct, loss_sum, len(eval_set[1])])
        return {"eval_accuracy": correct / n if n else float("nan"),
                "eval_loss": loss_sum / n if n else float("nan"), "eval_examples": int(n)}

    window = MetricWindow()
    last_idle_report = time.monotonic()
    stop_reason: str | None = None
    try:
        while spec.max_steps is None or counters["step"] < spec.max_steps:
            ready = batches.next()
            records, batch = (ready.records, ready.decoded) if ready is not None else (None, nothing)
            dlq.send(batch.rejected)
            # One collective decides, for every rank alike, whether the stream is done, how many
            # examples this step has (a step with none anywhere is skipped, not taken), and the
            # time- and event-driven triggers: each rank's own clock or view could disagree and
            # deadlock the collectives that follow, so any rank's trigger counts for all.
            now = time.monotonic()
            time_due = float(spec.checkpoint.every_s is not None and now - last_checkpoint >= spec.checkpoint.every_s)
            stalled_s = source.stalled_for()
            deadline = spec.source.stall_deadline_s
            n_global, not_done, rejected, time_due, stalled, past_deadline, stop, idle_due = all_ranks_sum(
                [len(batch), float(records is not None), len(batch.rejected), time_due, float(stalled_s > 0),
                 float(deadline is not None and stalled_s > deadline), float(stop_watch.poll() is not None),
                 float(now - last_idle_report >= IDLE_REPORT_EVERY_S)])
            counters["rejected"] += int(rejected)
            if past_deadline:
                why = (f"broker unreachable for {stalled_s:.0f} s: {source.trouble}" if stalled_s
                       else "another rank's broker connection stalled")
                raise SourceStalledError(f"{why} (past source.stall_deadline_s={deadline})")
            if stop:
                # The records fetched above count as consumed in the stop's checkpoint, so this
                # step still trains them; the loop ends after it.
                stop_reason = stop_watch.reason or "stop requested"
            if n_global == 0 and (not_done == 0 or stop_reason):
                break
            if n_global == 0:
                # Caught up (or stalled): report the steps not reported yet at once, so watchers
                # see exact counts, then a heartbeat (with the stall, if any) every few seconds.
                if window.steps or idle_due:
                    metrics = window_metrics(window)
                    if stalled:
                        worst = torch.tensor([stalled_s])
                        if distributed:
                            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                        metrics.update(stalled_s=float(worst),
                                       stall_reason=source.trouble or "another rank's broker is unreachable")
                    publish(metrics)
                    window, last_idle_report = MetricWindow(), now
                continue
            x, y = batch.inputs.to(device), batch.targets.to(device)
            if augment:
                x = pad_crop_flip(x, generator=randomness.augment)
            weights_active = not loss_fn.schedule.in_burn_in  # for this step, before loss_fn.step()
            out = loss_fn(model, x, y)
            # DDP averages gradients over ranks; each rank's loss is its share of the global
            # weighted loss, so scaling by the world size yields the global loss's gradient.
            (out.loss * world).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            loss_fn.step()
            counters["step"] += 1
            counters["examples"] += int(n_global)
            window.observe(loss=out.loss, targets=y, clean_labels=batch.clean_labels, logits=out.logits,
                           weights=out.weights, global_examples=int(n_global),
                           weights_active=weights_active)
            if record_log is not None:
                trained = [[r.partition, r.offset] for r in (records or [])
                           if all(r is not rej.record for rej in batch.rejected)]
                record_log.write(json.dumps({"pid": os.getpid(), "resumed_from": resumed_from,
                                             "step": counters["step"], "records": trained}) + "\n")
                record_log.flush()
            step = counters["step"]
            due = (checkpoint_owed or time_due > 0
                   or (spec.checkpoint.every_steps is not None and step % spec.checkpoint.every_steps == 0))
            eval_due = spec.evaluation is not None and step % spec.evaluation.every_steps == 0
            if step % spec.report_every_steps == 0 or due or eval_due:
                metrics = {**window_metrics(window), **{f"cicw_{k}": v for k, v in out.diagnostics.as_dict().items()}}
                if eval_due:
                    metrics.update(evaluate())
                window = MetricWindow()
                last_idle_report = time.monotonic()
                if due:
                    # A postponed checkpoint is tried again at the next step (the same on every rank).
                    checkpoint_owed = not save_and_report(metrics)
                    if not checkpoint_owed:
                        last_checkpoint = time.monotonic()
                else:
                    publish(metrics)
            if stop_reason:
                break
        final = {**window_metrics(window), "final": True, "stopped": stop_reason}
        if eval_set is not None:
            final.update(evaluate())
        save_and_report(final, final=True)
    finally:
        batches.close()
        source.close()
        if committer is not None and not committer.close(timeout_s=COMMIT_CLOSE_TIMEOUT_S):
            log.warning("the last checkpoint's offsets did not reach consumer group %s (%s; last committed: %s); "
                        "the checkpoint holds them", spec.consumer_group,
                        committer.last_error or "broker not answering", committer.committed)
        if record_log is not None:
            record_log.close()
