"""/v1/jobs: the REST face of JobService and of a job's artifacts. Handlers are plain ``def``s:
FastAPI runs them on its thread pool, so store, Ray and model calls never block the event loop."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response
from fastapi.responses import StreamingResponse

from service.core.deps import AdminAccess, ReadAccess, StateDep
from service.core.error_handlers import error_responses
from service.core.errors import Conflict
from workers.runner import latest_checkpoint, storage_location
from workers.spec import JobSpec

from . import checkpoints as ckpts
from .model_export import LoadedModel, model_card, safetensors_bytes
from .predict import predict
from .repository import JobRow
from .schemas import (
    CheckpointDetail,
    CheckpointList,
    JobList,
    JobOut,
    JobState,
    MetricPoint,
    MetricSeries,
    ModelCard,
    PredictRequest,
    PredictResponse,
    StopRequest,
)
from .views import job_out

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=error_responses(401, 403, 404, 422))

JobId = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="The job's id.")]
CheckpointId = Annotated[str, Path(max_length=200, description="A checkpoint's id, or 'latest'.")]


class NoCheckpointYet(Conflict):
    code = "no_checkpoint"


@router.post("", status_code=201, responses=error_responses(409, 413))
def submit_job(spec: JobSpec, _: AdminAccess, state: StateDep) -> JobOut:
    """Store the job and start it on Ray (201). A job id already in use is 409; an invalid spec
    is 422 naming the field. Failures after submission (broker unreachable, unknown topic) make
    the job FAILED with the reason."""
    return job_out(state.jobs.submit(spec))


@router.get("")
def list_jobs(_: ReadAccess, state: StateDep, job_state: Annotated[JobState | None, Query(alias="state")] = None,
              limit: Annotated[int, Query(ge=1, le=500)] = 50,
              cursor: Annotated[str | None, Query(max_length=500)] = None) -> JobList:
    """Jobs, newest first, ``limit`` a page; pass ``next_cursor`` back as ``cursor`` for the next."""
    rows, next_cursor = state.jobs.repo.list(job_state, limit, cursor)
    return JobList(items=[job_out(r) for r in rows], next_cursor=next_cursor)


@router.get("/{job_id}")
def get_job(job_id: JobId, _: ReadAccess, state: StateDep) -> JobOut:
    """The job's state (with the reason it failed or stopped) and its progress."""
    return job_out(state.jobs.get(job_id))


@router.post("/{job_id}/stop", status_code=202, responses=error_responses(409))
def stop_job(job_id: JobId, _: AdminAccess, state: StateDep, body: StopRequest | None = None) -> JobOut:
    """Ask a running job to finish its step, write a final checkpoint and stop (STOPPING, then
    STOPPED). 409 if the job is not running."""
    return job_out(state.jobs.stop(job_id, (body or StopRequest()).reason))


@router.post("/{job_id}/resume", status_code=202, responses=error_responses(409))
def resume_job(job_id: JobId, _: AdminAccess, state: StateDep) -> JobOut:
    """Run an ended job again under the same id, from its latest checkpoint (offsets included:
    each record reaches the model once across the stop). 409 while it runs."""
    return job_out(state.jobs.resume(job_id))


@router.delete("/{job_id}", status_code=204, responses=error_responses(409))
def delete_job(job_id: JobId, _: AdminAccess, state: StateDep, purge: bool = False) -> Response:
    """Forget an ended job (409 while it runs). Its checkpoints stay unless ``purge=true``."""
    state.jobs.delete(job_id, purge=(lambda spec: ckpts.purge_checkpoints(storage_location(spec), job_id))
                      if purge else None)
    return Response(status_code=204)


@router.get("/{job_id}/checkpoints")
def list_checkpoints(job_id: JobId, _: ReadAccess, state: StateDep) -> CheckpointList:
    """The job's durable checkpoints, newest first."""
    spec = state.jobs.spec_of(state.jobs.get(job_id))
    return CheckpointList(items=ckpts.list_checkpoints(storage_location(spec), job_id))


@router.get("/{job_id}/checkpoints/{checkpoint_id}")
def get_checkpoint(job_id: JobId, checkpoint_id: CheckpointId, _: ReadAccess, state: StateDep) -> CheckpointDetail:
    """One checkpoint: step, offsets per partition, the metrics reported with it, its size."""
    row = state.jobs.get(job_id)
    detail = ckpts.checkpoint_detail(storage_location(state.jobs.spec_of(row)), job_id, checkpoint_id)
    report = row.last_report
    if report is not None and report.checkpoint_step == detail.step:
        detail = detail.model_copy(update={"metrics": report})
    return detail


@router.get("/{job_id}/checkpoints/{checkpoint_id}/download",
            responses={200: {"content": {"application/gzip": {}}, "description": "A tar.gz of the checkpoint."}})
def download_checkpoint(job_id: JobId, checkpoint_id: CheckpointId, _: ReadAccess,
                        state: StateDep) -> StreamingResponse:
    """The checkpoint's files as a tar.gz, streamed."""
    spec = state.jobs.spec_of(state.jobs.get(job_id))
    location = ckpts.resolve_checkpoint(storage_location(spec), job_id, checkpoint_id)
    name = location.rstrip("/").rsplit("/", 1)[-1]
    return StreamingResponse(ckpts.archive_stream(location), media_type="application/gzip",
                             headers={"Content-Disposition": f'attachment; filename="{job_id}-{name}.tar.gz"'})


def _latest_model(job_id: str, state: StateDep) -> tuple[JobRow, JobSpec, LoadedModel]:
    row = state.jobs.get(job_id)
    spec = state.jobs.spec_of(row)
    durable = latest_checkpoint(storage_location(spec), job_id)
    if durable is None:
        raise NoCheckpointYet(f"job {job_id!r} has no checkpoint yet")
    return row, spec, state.models.load(spec, durable.location)


@router.get("/{job_id}/model", responses=error_responses(409))
def get_model_card(job_id: JobId, _: ReadAccess, state: StateDep) -> ModelCard:
    """What the latest model is (architecture, classes, input) and how good (accuracies, noise)."""
    row, spec, loaded = _latest_model(job_id, state)
    return model_card(spec, loaded, state.jobs.latest_training_report(row), row.spec_hash)


@router.get("/{job_id}/model/weights", responses={
    200: {"content": {"application/octet-stream": {}}, "description": "safetensors; the model card is in its "
                                                                        "metadata under cicw_model_card."},
    **error_responses(409)})
def get_model_weights(job_id: JobId, _: ReadAccess, state: StateDep) -> Response:
    """The latest model's weights as safetensors."""
    row, spec, loaded = _latest_model(job_id, state)
    body = safetensors_bytes(loaded, model_card(spec, loaded, state.jobs.latest_training_report(row), row.spec_hash))
    return Response(body, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{job_id}.safetensors"'})


@router.post("/{job_id}/predict", responses=error_responses(409, 413))
def predict_batch(job_id: JobId, body: PredictRequest, _: ReadAccess, state: StateDep) -> PredictResponse:
    """Class probabilities for each input, from the latest checkpoint. Inputs are in the job's
    record format (JSON values for json, base64 record bytes for raw and image); a bad input is
    422 naming ``inputs[i]``."""
    _row, spec, loaded = _latest_model(job_id, state)
    return PredictResponse(checkpoint=loaded.checkpoint, step=loaded.step,
                           predictions=predict(loaded, spec, body.inputs))


@router.get("/{job_id}/metrics")
def job_metrics(job_id: JobId, _: ReadAccess, state: StateDep,
                max_points: Annotated[int, Query(ge=1, le=5000)] = 500) -> MetricSeries:
    """The job's reports over time (all runs), downsampled to at most ``max_points``."""
    state.jobs.get(job_id)
    points, total = state.jobs.repo.series(job_id, max_points)
    return MetricSeries(job_id=job_id, total_reports=total,
                        points=[MetricPoint(at=at, run=run, report=report) for at, run, report in points])
