"""The app factory: `create_app(settings)` wires storage, the job runner, routes and middleware."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from ..job import JobState
from .errors import ApiError, error_response
from .jobs import JobRoutes, job_record
from .metrics import RUNNING_STATES, Metrics
from .middleware import AuthMiddleware, RateLimitMiddleware, RequestContextMiddleware
from .routes import artifact, health, info, metrics, openapi
from .runner import JobRunner, detect_devices
from .settings import ServerSettings, load_secret
from .storage import Storage
from .uploads import UploadService
from .webhooks import WebhookSender, load_webhook_secret
from .websocket import job_socket

__all__ = ["ServerState", "create_app"]

log = logging.getLogger(__name__)

Endpoint = Callable[[Request], Awaitable[Response]]

CLEAN_INTERVAL_S = 600.0


class ServerState:
    """Everything the routes share: settings, secret, storage, uploads, runner, metrics."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        for folder in (settings.raw_dir, settings.uploads_dir, settings.artifacts_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.secret = load_secret(settings)
        self.storage = Storage(settings.db_path)
        self.metrics = Metrics(
            self.storage.count_by_state,
            running_jobs=lambda: self.storage.jobs_in(*RUNNING_STATES),
            data_dir=settings.data_dir,
        )
        self.uploads = UploadService(settings, self.storage, self.metrics)
        self.devices = settings.devices or detect_devices()
        self.metrics.add_devices(self.devices)
        self.runner = JobRunner(
            self.storage,
            settings.artifacts_dir,
            self.devices,
            per_device=settings.jobs_per_device,
            metrics=self.metrics,
            executor=settings.executor,
            executor_options=_executor_options(settings),
        )
        self.webhooks = WebhookSender(
            self.storage, settings, load_webhook_secret(settings), self._webhook_body
        )

    def _webhook_body(self, job_id: str) -> dict[str, Any] | None:
        row = self.storage.job(job_id)
        return job_record(self, row) if row is not None else None

    def model_names(self) -> list[str]:
        from .. import plugins

        names = plugins.models().names()
        allowed = self.settings.models
        return [n for n in names if not allowed or n in allowed]

    def model_infos(self) -> list[dict[str, Any]]:
        from .. import plugins

        registry = plugins.models()
        out = []
        for name in self.model_names():
            spec = registry.get(name)
            try:
                labels = {str(k): v for k, v in spec.labels().items()}
            except Exception as exc:  # a broken model folder must not break /server/info
                labels = {"error": str(exc)}
            out.append({"name": name, "description": spec.description, "labels": labels})
        return out

    def boot(self) -> None:
        """Crash recovery, then clean-up, then start the workers."""
        recovered = self.runner.recover(self.settings.on_restart)
        cleaned = self.uploads.clean()
        self._clean_artifacts()
        log.info("boot: jobs %s, clean-up %s", recovered, cleaned)
        self.runner.start()
        self.webhooks.start()

    def _clean_artifacts(self) -> None:
        """Keep only completed jobs' folders, without leftover temporary files."""
        import shutil

        root: Path = self.settings.artifacts_dir
        for entry in root.iterdir():
            row = self.storage.job(entry.name) if entry.is_dir() else None
            if row is None or row["state"] != JobState.COMPLETED:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                continue
            for f in entry.iterdir():
                if f.name.startswith(".tmp-"):
                    f.unlink(missing_ok=True)

    def shutdown(self) -> None:
        self.runner.stop()
        self.webhooks.stop()  # after the runner: the jobs it ended get their deliveries queued
        self.storage.close()


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    hints = {
        404: "see /v1/openapi.json for the routes",
        405: "see /v1/openapi.json for the methods each route takes",
    }
    return error_response(
        ApiError(
            exc.status_code,
            codes.get(exc.status_code, "http_error"),
            str(exc.detail),
            hints.get(exc.status_code, ""),
            headers=dict(exc.headers or {}),  # 405 keeps its Allow
        )
    )


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(
        ApiError(
            500,
            "internal_error",
            "the server hit an unexpected error",
            "this is a bug in CryoMamba; please report it with the server log",
            retryable=True,
        )
    )


def _by_method(**handlers: Endpoint) -> Endpoint:
    """One endpoint for a path that several methods share, so a 405 lists them all in Allow."""
    handlers.setdefault("HEAD", handlers["GET"])

    async def endpoint(request: Request) -> Response:
        return await handlers[request.method](request)

    return endpoint


def create_app(settings: ServerSettings) -> Starlette:
    """One Starlette app for `settings` (STYLE §8); storage and workers start with its lifespan."""
    server = ServerState(settings)
    jobs = JobRoutes(server)
    up = server.uploads
    routes = [
        Route("/v1/healthz", health),
        Route("/v1/server/info", info),
        Route("/v1/uploads/init", up.init, methods=["POST"]),
        Route("/v1/uploads/{upload_id}", up.status),
        Route("/v1/uploads/{upload_id}/part/{idx}", up.put_part, methods=["PUT"]),
        Route("/v1/uploads/{upload_id}/complete", up.complete, methods=["POST"]),
        Route("/v1/jobs", _by_method(GET=jobs.list, POST=jobs.create), methods=["GET", "POST"]),
        Route(
            "/v1/jobs/{job_id}",
            _by_method(GET=jobs.get, DELETE=jobs.cancel),
            methods=["GET", "DELETE"],
        ),
        WebSocketRoute("/v1/ws/jobs/{job_id}", job_socket),
        Route("/v1/files/{job_id}/{artifact}", artifact),
        Route("/v1/openapi.json", openapi),
        Route("/metrics", metrics),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        server.boot()
        cleaner = asyncio.create_task(_clean_periodically(server))
        try:
            yield
        finally:
            cleaner.cancel()
            server.shutdown()

    app = Starlette(
        routes=routes,
        middleware=[
            *_proxy_middleware(settings),
            Middleware(RequestContextMiddleware, metrics=server.metrics, routes=routes),
            Middleware(
                AuthMiddleware,
                secret=server.secret,
                failures_per_min=settings.auth_failures_per_min,
            ),
            Middleware(RateLimitMiddleware, per_minute=settings.rate_limit_per_min),
        ],
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
        lifespan=lifespan,
    )
    app.state.server = server
    return app


def _proxy_middleware(settings: ServerSettings) -> list[Middleware]:
    """X-Forwarded-For/-Proto set the client address and scheme, from `trusted_proxies` only.

    Outermost, so the access log, the audit log and the per-address limits all see the real
    client. From any other peer (and with no trusted proxy, the default) the headers are
    ignored: anyone can forge them."""
    if not settings.trusted_proxies:
        return []
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    return [Middleware(ProxyHeadersMiddleware, trusted_hosts=list(settings.trusted_proxies))]


async def _clean_periodically(server: ServerState) -> None:
    import anyio

    while True:
        await asyncio.sleep(CLEAN_INTERVAL_S)
        try:
            await anyio.to_thread.run_sync(server.uploads.clean)
        except Exception:
            log.exception("periodic clean-up failed")


def _executor_options(settings: ServerSettings) -> dict[str, Any]:
    """The executor factory's options: a dask back end gets its cluster, and its workers write
    artifacts straight into the artifacts folder (which must be on storage they share)."""
    if settings.executor != "dask":
        return {}
    return {"cluster": settings.cluster, "out": settings.artifacts_dir}
