"""A typed client of the service's REST API (/v1/jobs), shared by the CLI and scripts.

Every method returns the contract's model (``service.jobs.schemas``) or raises one of:

- :class:`ApiError`: the service answered with an error status; ``status`` and the typed
  ``body`` (``ErrorBody``: code, message, field) say why;
- :class:`ApiUnreachable`: no answer (connection refused, DNS, timeout), naming the URL;
- :class:`ApiProtocolError`: an answer that is not what the contract says (not JSON, wrong shape).

Downloads stream to a temporary file beside the destination and are renamed over it only when
complete, so a destination never holds a partial file.

>>> import httpx
>>> from service.client_config import ClientConfig
>>> def api(request: httpx.Request) -> httpx.Response:
...     return httpx.Response(404, json={"code": "job_not_found", "message": "no job 'x'"})
>>> with ApiClient(ClientConfig(), transport=httpx.MockTransport(api)) as client:
...     client.get_job("x")
Traceback (most recent call last):
...
service.client.ApiError: HTTP 404 job_not_found: no job 'x'
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from service.client_config import ClientConfig
from service.jobs.schemas import (
    CheckpointDetail,
    CheckpointList,
    ErrorBody,
    JobList,
    JobOut,
    JobState,
    MetricSeries,
    ModelCard,
    PredictRequest,
    PredictResponse,
    StopRequest,
)
from workers.errors import CicwStreamError

M = TypeVar("M", bound=BaseModel)
# Pages the client asks for while following cursors (the service may return fewer).
PAGE_SIZE = 100
# Download chunks: large enough to keep syscalls few, small enough to bound memory.
_CHUNK_BYTES = 1 << 20
# Fetches of card + weights + card before giving up on a model that keeps changing underneath.
_MODEL_ATTEMPTS = 3


class ApiError(CicwStreamError):
    """The service answered ``status`` (4xx/5xx) with ``body`` saying why."""

    def __init__(self, status: int, body: ErrorBody) -> None:
        where = f" ({body.field})" if body.field else ""
        super().__init__(f"HTTP {status} {body.code}: {body.message}{where}")
        self.status = status
        self.body = body

    def __reduce__(self) -> tuple[type[ApiError], tuple[int, ErrorBody]]:
        return type(self), (self.status, self.body)


class ApiUnreachable(CicwStreamError):
    """No answer from the service at ``url``: refused, unresolvable, or timed out."""

    def __init__(self, message: str, url: str = "") -> None:
        super().__init__(message)
        self.url = url

    def __reduce__(self) -> tuple[type[ApiUnreachable], tuple[str, str]]:
        return type(self), (str(self), self.url)


class ApiProtocolError(CicwStreamError, ValueError):
    """The service's answer does not match the REST contract (another version, or not the service)."""


class SavedCheckpoint(BaseModel):
    """A checkpoint downloaded as tar.gz."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    path: Path
    size_bytes: int
    checkpoint: CheckpointDetail


class SavedModel(BaseModel):
    """A model downloaded as its card (JSON) and weights (safetensors) of the same checkpoint."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    card_path: Path
    weights_path: Path
    weights_bytes: int
    card: ModelCard


def _segment(value: str) -> str:
    # Ids become one path segment each: "../x" or "a/b" must not address another route.
    return quote(value, safe="")


class ApiClient:
    """The REST API's operations, one method each. Use as a context manager (or call close())."""

    def __init__(self, config: ClientConfig, *, transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Accept": "application/json", "User-Agent": "cicw-stream-cli"}
        if config.token is not None:
            headers["Authorization"] = f"Bearer {config.token.get_secret_value()}"
        self.config = config
        self._http = httpx.Client(base_url=config.url, headers=headers, timeout=config.timeout_s,
                                  transport=transport, follow_redirects=False)

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    # -- jobs -------------------------------------------------------------------------------

    def submit(self, spec: Mapping[str, Any]) -> JobOut:
        """POST /v1/jobs: start a job from a spec document (the service applies its defaults)."""
        return self._call(JobOut, "POST", "/v1/jobs", json=dict(spec))

    def list_jobs(self, *, state: JobState | None = None, limit: int | None = None,
                  cursor: str | None = None) -> JobList:
        """GET /v1/jobs: one page, newest first."""
        params = {key: str(value) for key, value in (("state", state), ("limit", limit), ("cursor", cursor))
                  if value is not None}
        return self._call(JobList, "GET", "/v1/jobs", params=params)

    def iter_pages(self, *, state: JobState | None = None, limit: int | None = None) -> Iterator[JobList]:
        """Pages of jobs (of ``state``), newest first, following the cursors until the last page or
        until ``limit`` jobs in all (None: every job). The last page's ``next_cursor`` continues
        where the limit cut."""
        cursor: str | None = None
        seen = 0
        while limit is None or seen < limit:
            want = PAGE_SIZE if limit is None else min(PAGE_SIZE, limit - seen)
            page = self.list_jobs(state=state, limit=want, cursor=cursor)
            yield page
            seen, cursor = seen + len(page.items), page.next_cursor
            if cursor is None or not page.items:
                return

    def iter_jobs(self, *, state: JobState | None = None, limit: int | None = None) -> Iterator[JobOut]:
        """Jobs (of ``state``), newest first, at most ``limit`` (None: all), page by page."""
        for page in self.iter_pages(state=state, limit=limit):
            yield from page.items

    def get_job(self, job_id: str) -> JobOut:
        """GET /v1/jobs/{id}: state and progress."""
        return self._call(JobOut, "GET", f"/v1/jobs/{_segment(job_id)}")

    def stop(self, job_id: str, reason: str | None = None) -> JobOut:
        """POST /v1/jobs/{id}/stop: checkpoint and stop (None: the service's default reason)."""
        body = StopRequest() if reason is None else StopRequest(reason=reason)
        return self._call(JobOut, "POST", f"/v1/jobs/{_segment(job_id)}/stop",
                          json=body.model_dump(exclude_unset=True))

    def resume(self, job_id: str) -> JobOut:
        """POST /v1/jobs/{id}/resume: run a stopped or failed job again from its latest checkpoint."""
        return self._call(JobOut, "POST", f"/v1/jobs/{_segment(job_id)}/resume")

    def delete(self, job_id: str, *, purge: bool = False) -> None:
        """DELETE /v1/jobs/{id}: forget an inactive job; ``purge`` also deletes its checkpoints."""
        self._send("DELETE", f"/v1/jobs/{_segment(job_id)}", params={"purge": str(purge).lower()}).close()

    # -- checkpoints and model --------------------------------------------------------------

    def checkpoints(self, job_id: str) -> CheckpointList:
        """GET /v1/jobs/{id}/checkpoints: durable checkpoints, newest first."""
        return self._call(CheckpointList, "GET", f"/v1/jobs/{_segment(job_id)}/checkpoints")

    def checkpoint(self, job_id: str, ckpt: str = "latest") -> CheckpointDetail:
        """GET /v1/jobs/{id}/checkpoints/{ckpt}: offsets, metrics and size of one checkpoint."""
        return self._call(CheckpointDetail, "GET", f"/v1/jobs/{_segment(job_id)}/checkpoints/{_segment(ckpt)}")

    def download(self, job_id: str, ckpt: str, dest: Path) -> Path:
        """Stream checkpoint ``ckpt`` (tar.gz) to ``dest``; returns ``dest``."""
        return self._stream_to(f"/v1/jobs/{_segment(job_id)}/checkpoints/{_segment(ckpt)}/download", dest)

    def save_checkpoint(self, job_id: str, ckpt: str, dest: Path | Callable[[CheckpointDetail], Path]) -> \
            SavedCheckpoint:
        """Download a checkpoint by name, "latest" resolved first so that the file, its name and the
        returned detail are one checkpoint even if another is written meanwhile. ``dest`` may be a
        function of the resolved detail (to name the file after it)."""
        detail = self.checkpoint(job_id, ckpt)
        path = self.download(job_id, detail.id, dest(detail) if callable(dest) else dest)
        return SavedCheckpoint(path=path, size_bytes=path.stat().st_size, checkpoint=detail)

    def model_card(self, job_id: str) -> ModelCard:
        """GET /v1/jobs/{id}/model: what the latest model is and how good it is."""
        return self._call(ModelCard, "GET", f"/v1/jobs/{_segment(job_id)}/model")

    def model_weights(self, job_id: str, dest: Path) -> Path:
        """Stream the latest model's weights (safetensors, the card in its metadata) to ``dest``."""
        return self._stream_to(f"/v1/jobs/{_segment(job_id)}/model/weights", dest)

    def save_model(self, job_id: str, directory: Path, *, card_name: str = "model_card.json",
                   weights_name: str = "model.safetensors") -> SavedModel:
        """Write the card and the weights into ``directory``, of the same checkpoint: the card is
        read before and after the weights, and all is fetched again if a checkpoint landed between."""
        directory.mkdir(parents=True, exist_ok=True)
        for _ in range(_MODEL_ATTEMPTS):
            before = self.model_card(job_id)
            weights = self.model_weights(job_id, directory / weights_name)
            card = self.model_card(job_id)
            if card.checkpoint == before.checkpoint:
                card_path = _write_atomic(directory / card_name, card.model_dump_json(indent=2).encode() + b"\n")
                return SavedModel(card_path=card_path, weights_path=weights, weights_bytes=weights.stat().st_size,
                                  card=card)
        raise ApiProtocolError(f"job {job_id}'s model changed during each of {_MODEL_ATTEMPTS} downloads; "
                               "stop the job or try again")

    def predict(self, job_id: str, inputs: Sequence[Any]) -> PredictResponse:
        """POST /v1/jobs/{id}/predict: labels and class probabilities of 1 to 1024 inputs."""
        body = PredictRequest(inputs=list(inputs))
        return self._call(PredictResponse, "POST", f"/v1/jobs/{_segment(job_id)}/predict",
                          json=body.model_dump(mode="json"))

    def metrics(self, job_id: str, *, max_points: int | None = None) -> MetricSeries:
        """GET /v1/jobs/{id}/metrics: the job's reports over time, downsampled to ``max_points``."""
        params = {} if max_points is None else {"max_points": str(max_points)}
        return self._call(MetricSeries, "GET", f"/v1/jobs/{_segment(job_id)}/metrics", params=params)

    # -- transport --------------------------------------------------------------------------

    def _call(self, model: type[M], method: str, path: str, *, json: Any = None,
              params: Mapping[str, str] | None = None) -> M:
        response = self._send(method, path, json=json, params=params)
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise ApiProtocolError(f"{method} {path}: the answer is not a {model.__name__}: "
                                   f"{exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}") from None

    def _send(self, method: str, path: str, *, json: Any = None,
              params: Mapping[str, str] | None = None) -> httpx.Response:
        try:
            response = self._http.request(method, path, json=json, params=params)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        _raise_for_error(response)
        return response

    def _stream_to(self, path: str, dest: Path) -> Path:
        try:
            with self._http.stream("GET", path) as response:
                if response.is_error:
                    response.read()
                    _raise_for_error(response)
                return _write_atomic(dest, response.iter_bytes(_CHUNK_BYTES))
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: httpx.TransportError) -> ApiUnreachable:
        kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "unreachable"
        # str(exc) of httpx names the failure (refused, name resolution) and never a header.
        return ApiUnreachable(f"the service at {self.config.url} is {kind}: {exc or type(exc).__name__}",
                              self.config.url)


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_redirect:
        raise ApiProtocolError(f"the service redirected to {response.headers.get('location')!r}: "
                               "give that URL (the client does not forward the token to another address)")
    if response.is_error:
        raise ApiError(response.status_code, _error_body(response))


def _error_body(response: httpx.Response) -> ErrorBody:
    """The ErrorBody, or one made from whatever a proxy or another server sent instead."""
    with contextlib.suppress(ValidationError):
        return ErrorBody.model_validate_json(response.content)
    text = response.text.strip()
    message = text[:200] if text and not text.startswith("<") else response.reason_phrase
    return ErrorBody(code=f"http_{response.status_code}", message=message or "no message")


def _write_atomic(dest: Path, data: bytes | Iterator[bytes]) -> Path:
    """Write to a temporary file in ``dest``'s directory, flush it to disk, rename it over ``dest``;
    on any error the temporary file is removed and ``dest`` is untouched."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in [data] if isinstance(data, bytes) else data:
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return dest
