"""The FastAPI app: API routes, pages, token check, metrics, and errors as one-line JSON."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from pathlib import Path

import swagger_ui_bundle
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from defectscope._version import __version__
from defectscope.errors import DefectscopeError, StorageError
from defectscope.files import finite_or_none
from defectscope.line.audit import AuditLog
from defectscope.line.dispatch import Dispatcher
from defectscope.line.drift import recent_drift
from defectscope.line.outbox import OUTBOX, RESEND_BATCH, send_missed
from defectscope.line.retention import ImageKeeper
from defectscope.service.api import router
from defectscope.service.config import ServiceConfig
from defectscope.service.models import ServedModel
from defectscope.service.schemas import Health
from defectscope.service.telemetry import Telemetry

STATIC = Path(__file__).with_name("static")
PROTECTED = ("/v1/", "/metrics")
MULTIPART_SLACK = 1024 * 1024  # headers and boundaries a request may carry beyond its files


class BodyRefused(Exception):
    """The request body grew beyond the service's limit, or did not arrive in time."""

    def __init__(self, response: JSONResponse) -> None:
        super().__init__(response.status_code)
        self.response = response


class BodyLimit:
    """ASGI middleware: refuse a body above `limit` bytes from its Content-Length, or as soon as it grows past it
    (413), and a body that has not arrived within `timeout` seconds (408: a stalled upload holds nothing for long)."""

    def __init__(self, app, limit: int, timeout: float) -> None:
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            return await _too_large(self.limit)(scope, receive, send)
        received, refused, deadline = 0, None, asyncio.get_running_loop().time() + self.timeout

        async def limited_receive():
            nonlocal received, refused
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except TimeoutError:
                refused = JSONResponse({"detail": f"the request body did not arrive within {self.timeout:g} s"}, 408,
                                       headers={"Connection": "close"})
                raise BodyRefused(refused) from None
            received += len(message.get("body", b""))
            if received > self.limit:
                refused = _too_large(self.limit)
                raise BodyRefused(refused)
            return message

        async def guarded_send(message) -> None:  # once refused, whatever the app answers becomes the refusal
            if refused is None:
                await send(message)
            elif message["type"] == "http.response.start":
                await refused(scope, receive, send)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyRefused as exc:
            await exc.response(scope, receive, send)


async def _send_missed_every(audit: AuditLog, dispatch: Dispatcher, seconds: float) -> None:
    """From the start (a previous run's misses too), every `seconds`: send again what a dispatch target missed (after
    a full batch, the next as soon as it is through)."""
    while True:
        resent = await run_in_threadpool(send_missed, audit, dispatch, OUTBOX)
        await asyncio.sleep(min(seconds, 0.5) if resent == RESEND_BATCH else seconds)


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"detail": f"the request body is larger than {limit:,} bytes"}, 413)


def create_app(models: dict[str, ServedModel], config: ServiceConfig | None = None, labelled: Path | None = None,
               audit: AuditLog | None = None, dispatch: Dispatcher | None = None, keeper: ImageKeeper | None = None
               ) -> FastAPI:
    """An app serving these loaded models; `labelled` is the dataset folder new models are scored on; every verdict
    goes to the `audit` trail and the `dispatch` targets when given, and the `keeper` keeps the images it chooses."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        resending = None
        if audit is not None and dispatch is not None and dispatch.lanes:
            resending = asyncio.get_running_loop().create_task(_send_missed_every(audit, dispatch, app.state.config.redeliver_s))
        yield
        if resending is not None:
            resending.cancel()
        for model in models.values():
            model.batcher.close()
        if dispatch is not None:
            dispatch.close()
        if audit is not None:
            audit.close()

    app = FastAPI(title="defectscope", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Inspect parts: scores, verdicts, heatmaps and defect regions from defectscope models.")
    app.state.models, app.state.config, app.state.labelled = models, config or ServiceConfig(), labelled
    app.state.audit, app.state.dispatch, app.state.keeper = audit, dispatch, keeper
    app.state.telemetry = telemetry = Telemetry()
    app.state.writing = asyncio.Lock()  # one model write at a time: a name found free stays free until it is written
    app.include_router(router)
    app.add_middleware(BodyLimit, limit=app.state.config.max_request_bytes + MULTIPART_SLACK,
                       timeout=app.state.config.body_timeout_s)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")

    @app.middleware("http")
    async def guard_and_measure(request: Request, call_next):
        path = request.url.path
        route = request.scope.get("route")
        start = time.perf_counter()
        request.state.role = app.state.config.role_of(_bearer(request))
        if request.state.role is None and path.startswith(PROTECTED):
            response = JSONResponse({"detail": "missing or wrong token: send 'Authorization: Bearer <token>'"}, 401,
                                    headers={"WWW-Authenticate": "Bearer"})
        else:
            response = await call_next(request)
        route = getattr(request.scope.get("route", route), "path", "unmatched")
        telemetry.requests.labels(route, str(response.status_code)).inc()
        telemetry.latency.labels(route).observe(time.perf_counter() - start)
        if response.status_code >= 400:
            telemetry.errors.labels(str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": finite_or_none(jsonable_encoder(exc.errors()))}, 422)  # a NaN input is echoed as null

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        """Swagger UI from the assets this app serves itself (no CDN: works offline)."""
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="defectscope API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")

    @app.exception_handler(DefectscopeError)
    async def library_error(_request: Request, exc: DefectscopeError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 400)

    @app.exception_handler(StorageError)
    async def storage_error(_request: Request, exc: StorageError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 507)  # Insufficient Storage: not the request's fault

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, _exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": "internal error; the server log has the details"}, 500)

    @app.get("/health", response_model=Health, tags=["service"])
    def health() -> Health:
        return Health(status="ok", models=len(app.state.models), version=__version__)

    @app.get("/metrics", response_class=Response, tags=["service"], responses={200: {"content": {"text/plain": {}}}})
    def metrics() -> Response:
        for name, model in app.state.models.items():
            telemetry.queue.labels(name).set(model.batcher.pending)
            telemetry.batches.labels(name).set(model.batcher.batches)
            if audit is not None:
                telemetry.drift.labels(name).set(recent_drift(audit, model.sha256, model.detector.calibration).drifted)
        if dispatch is not None:  # with an audit trail, its journal's count: a verdict sent again counts once
            telemetry.undelivered.set(dispatch.failed if audit is None else audit.undelivered_count(OUTBOX))
        return Response(generate_latest(telemetry.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    return app


def _bearer(request: Request) -> str | None:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return given if scheme.lower() == "bearer" else None
