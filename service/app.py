"""The FastAPI application: ``create_app(settings)`` builds it; resources (the store, the token
store, the launcher that reaches Ray, the metrics registry, the thread that keeps job states in
step with their drivers) are created in the lifespan and kept on ``app.state.cicw``."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from workers.errors import CicwStreamError

from .core import db
from .core.config import Settings
from .core.deps import AppState, ReadAccess, StateDep
from .core.error_handlers import error_responses, install_error_handlers
from .core.errors import Unavailable
from .core.limits import BodySizeLimit
from .core.metrics import HttpMetrics, JobMetricsView, build_registry
from .core.secrets import SecretSealer
from .core.security import TokenStore
from .jobs.model_export import ModelCache
from .jobs.repository import JobRepository
from .jobs.routes import router as jobs_router
from .jobs.service import JobService, Launcher

log = logging.getLogger(__name__)
# Requests to these paths are not counted in the HTTP metrics (probes would drown the rest).
_UNMETERED = frozenset({"/healthz", "/readyz", "/metrics"})


class StateSync:
    """Polls the drivers of active jobs every ``interval_s`` on a thread of its own."""

    def __init__(self, jobs: JobService, interval_s: float) -> None:
        self._jobs = jobs
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cicw-job-sync", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._jobs.sync()
            except Exception:  # a bug or an outage must not end reconciliation for good
                log.exception("job state sync failed; retrying")


class RequestMetering:
    """Counts requests and their latency by route template (plain ASGI: Starlette's
    BaseHTTPMiddleware costs a task and a stream per request)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app raises before answering

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            template = getattr(scope.get("route"), "path", None)
            meter: HttpMetrics | None = getattr(scope["app"].state, "http_metrics", None)
            if template is not None and template not in _UNMETERED and meter is not None:
                meter.observe(scope["method"], template, status, time.perf_counter() - started)


def default_launcher(settings: Settings) -> Launcher:
    """Connect to Ray (the configured cluster, or the embedded head) and launch jobs there."""
    from .core.ray_head import connect, ensure_local_head
    from .jobs.driver import RayLauncher

    address = settings.ray_address or ensure_local_head(settings.data_dir / "ray", num_cpus=settings.ray_num_cpus)
    connect(address)
    return RayLauncher(model_packages=settings.model_packages)


def create_app(settings: Settings, *, tokens: TokenStore, launcher: Launcher | None = None) -> FastAPI:
    """The API, accepting ``tokens`` (see security.load_tokens); ``launcher`` replaces the Ray
    launcher (tests)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = db.make_engine(settings.database_url)
        db.migrate(engine)
        sealer = SecretSealer.from_settings(settings.secret_key.get_secret_value() if settings.secret_key else None,
                                            settings.data_dir / "secret.key")
        repo = JobRepository(db.session_factory(engine), sealer)
        jobs = JobService(repo, launcher or default_launcher(settings),
                          lost_driver_grace_s=settings.lost_driver_grace_s)

        def views() -> list[JobMetricsView]:
            return [JobMetricsView(job_id=r.id, state=r.state, report=r.last_report,
                                   last_checkpoint_at=r.last_checkpoint_at) for r in repo.all_for_metrics()]

        registry = build_registry(views)
        app.state.cicw = AppState(settings=settings, tokens=tokens, jobs=jobs,
                                  models=ModelCache(model_packages=settings.model_packages), registry=registry)
        app.state.http_metrics = HttpMetrics(registry)
        app.state.engine = engine
        sync = StateSync(jobs, settings.sync_interval_s)
        sync.start()
        try:
            yield
        finally:
            sync.close()
            engine.dispose()

    app = FastAPI(title="cicw-stream", version="1", lifespan=lifespan,
                  description="Continuous training on noisy-labelled Kafka streams with CICW: submit, watch, "
                              "stop, resume jobs; download checkpoints and models; predict.")
    install_error_handlers(app)
    app.include_router(jobs_router)
    _add_operational_routes(app)

    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetering)
    return app


def _add_operational_routes(app: FastAPI) -> None:
    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], responses=error_responses(503))
    def readyz(state: StateDep, request: Request) -> dict[str, str]:
        """The job store and Ray answer (503 naming which does not)."""
        try:
            db.ping(request.app.state.engine)
        except Exception as exc:
            raise Unavailable(f"job store unreachable: {type(exc).__name__}: {exc}") from exc
        try:
            state.jobs.launcher.ready()
        except CicwStreamError as exc:
            raise Unavailable(f"Ray unreachable: {exc}") from exc
        return {"status": "ready"}

    @app.get("/metrics", tags=["operations"],
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, **error_responses(401, 403)})
    def metrics(_: ReadAccess, state: StateDep) -> Response:
        """Prometheus exposition of every job's metrics and the API's own (see the README)."""
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)


