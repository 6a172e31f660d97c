"""The HTTP API of ``vidloom serve``: the OpenAI Videos API (``/v1/videos``) as the official
``openai`` client speaks it, plus ``/v1/models``, ``/health`` and Prometheus ``/metrics``.

Everything the app needs lives on ``app.state`` (the generator, the store, the engine loop, the
settings), made by :func:`create_app`; no module globals. Needs the ``serve`` extra
(``pip install 'vidloom[serve]'``).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..errors import InvalidRequestError
from .requests import UPLOADS, parse
from .store import COMPLETED, FAILED, IN_PROGRESS, QUEUED, Job, JobStore, SQLiteJobStore

MAX_BODY_BYTES = 64 * 1024 * 1024  # a request, uploads included
MAX_UPLOAD_BYTES = 32 * 1024 * 1024  # one image
MAX_FORM_FIELDS = 64
MAX_PAGE = 100


@dataclass(frozen=True)
class ServeSettings:
    """``api_key``: required as ``Authorization: Bearer`` when set; ``max_queue``: queued jobs
    beyond which a new one is refused (429); ``poll_after_ms``: the ``openai-poll-after-ms`` hint;
    ``max_active``: jobs in flight at once, whose denoising steps may be batched."""

    model_name: str
    data_dir: Path
    api_key: str | None = None
    max_queue: int = 64
    poll_after_ms: int = 1000
    max_active: int = 4  # jobs the engine loop advances together (1: one job at a time)
    batch_steps: bool = True  # their compatible denoising steps as one transformer forward
    max_body_bytes: int = MAX_BODY_BYTES  # a request, uploads included, however it is sent
    defaults: tuple[tuple[str, Any], ...] = ()


class BodyTooLarge(Exception):
    """The body passed ``max_body_bytes`` while being read (a chunked body has no Content-Length)."""


class BodyLimit:
    """ASGI middleware: counts every request's body bytes as they arrive and stops reading past the
    limit, so a chunked upload cannot fill the disk where the form parser spools files."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(f"the request body is larger than {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def video_object(job: Job) -> dict[str, Any]:
    """A job as the OpenAI ``Video`` object."""
    error = None
    if job.status == FAILED:
        error = {"code": job.error_code or "generation_failed", "message": job.error_message or ""}
    return {
        "id": job.id, "object": "video", "model": job.model, "status": job.status, "progress": job.progress,
        "created_at": int(job.created_at), "completed_at": None if job.completed_at is None else int(job.completed_at),
        "expires_at": None, "error": error, "prompt": job.prompt, "seconds": job.seconds, "size": job.size,
        "remixed_from_video_id": None,
    }


def create_app(generator, settings: ServeSettings, store: JobStore | None = None, start_loop: bool = True,
               ranks=None):
    """The FastAPI app serving ``generator``; the store defaults to ``data_dir/jobs.sqlite3``;
    ``ranks``: ``scheduler.RankBroadcast`` on rank 0 of a multi-process server."""
    from .scheduler import EngineLoop, Metrics

    data_dir = Path(settings.data_dir)
    for sub in ("videos", "inputs"):
        (data_dir / sub).mkdir(parents=True, exist_ok=True)
    store = store or SQLiteJobStore(data_dir / "jobs.sqlite3")
    recovered = store.recover()
    registry = CollectorRegistry()
    metrics = Metrics(registry, store)
    loop = EngineLoop(generator, store, data_dir / "videos", metrics, max_active=settings.max_active,
                      batch_steps=settings.batch_steps, ranks=ranks)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if start_loop:
            loop.start()
        yield
        loop.stop()

    app = FastAPI(title="vidloom", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.state.generator, app.state.store, app.state.loop, app.state.settings = generator, store, loop, settings
    app.state.recovered = recovered

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        body = {"error": {"message": exc.message, "type": "invalid_request_error" if exc.status < 500 else "server_error",
                          "param": exc.param, "code": exc.code}}
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        # the key first (constant-time), then the body size, before any route reads anything
        if settings.api_key is not None and request.url.path not in ("/health", "/"):
            given = request.headers.get("authorization", "")
            expected = f"Bearer {settings.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return JSONResponse({"error": {"message": "missing or wrong API key (Authorization: Bearer KEY)",
                                               "type": "invalid_request_error", "param": None,
                                               "code": "invalid_api_key"}}, status_code=401)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            return JSONResponse({"error": {"message": f"the request body is larger than {settings.max_body_bytes} bytes",
                                           "type": "invalid_request_error", "param": None, "code": "too_large"}},
                                status_code=413)
        return await call_next(request)

    def _job_or_404(video_id: str) -> Job:
        job = store.get(video_id) if len(video_id) <= 64 else None
        if job is None:
            raise APIError(404, f"no video with id {video_id[:64]!r}", "video_id", "not_found")
        return job

    async def _read_request(request: Request) -> tuple[dict[str, Any], dict[str, bytes]]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            body = await _body(request)
            try:
                values = json.loads(body)
            except ValueError as exc:
                raise APIError(400, f"the body is not valid JSON: {exc}", None, "invalid_json") from None
            if not isinstance(values, dict):
                raise APIError(400, "the JSON body must be an object", None, "invalid_json")
            for name in UPLOADS:
                if name in values:
                    raise APIError(400, f"{name}: send images as multipart/form-data uploads", name, "invalid_value")
            return values, {}
        if kind != "multipart/form-data":
            raise APIError(415, "send multipart/form-data (as the openai client does) or application/json", None,
                           "unsupported_media_type")
        try:
            form = await request.form(max_files=len(UPLOADS), max_fields=MAX_FORM_FIELDS,
                                      max_part_size=MAX_UPLOAD_BYTES)
        except BodyTooLarge as exc:
            raise APIError(413, str(exc), None, "too_large") from None
        except Exception as exc:  # noqa: BLE001 - a malformed or oversized form is the client's error
            raise APIError(400, f"malformed multipart body: {exc}", None, "invalid_multipart") from None
        values, files = {}, {}
        for name, value in form.multi_items():
            if name in values or name in files:
                raise APIError(400, f"{name[:60]}: given twice", name[:60], "invalid_value")
            if hasattr(value, "read"):  # an upload
                if name not in UPLOADS:
                    raise APIError(400, f"{name[:60]}: unexpected file (files: {', '.join(UPLOADS)})", name[:60],
                                   "invalid_value")
                data = await value.read(MAX_UPLOAD_BYTES + 1)
                if len(data) > MAX_UPLOAD_BYTES:
                    raise APIError(413, f"{name}: larger than {MAX_UPLOAD_BYTES} bytes", name, "too_large")
                files[name] = data
            else:
                values[name] = value
        await form.close()
        return values, files

    async def _body(request: Request) -> bytes:
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > settings.max_body_bytes:
                    raise BodyTooLarge(f"the request body is larger than {settings.max_body_bytes} bytes")
                chunks.append(chunk)
        except BodyTooLarge as exc:
            raise APIError(413, str(exc), None, "too_large") from None
        return b"".join(chunks)

    @app.post("/v1/videos")
    async def create_video(request: Request):
        values, files = await _read_request(request)
        if store.counts()[QUEUED] >= settings.max_queue:
            raise APIError(429, f"the queue is full ({settings.max_queue} jobs waiting)", None, "queue_full",
                           headers={"Retry-After": "30"})
        job_id = f"video_{secrets.token_hex(12)}"
        inputs = {}
        try:
            parsed = parse(values, settings.model_name, dict(settings.defaults))
            for name, data in files.items():
                path = data_dir / "inputs" / f"{job_id}.{name}"  # server-made name: no user input in a path
                path.write_bytes(data)
                inputs[UPLOADS[name]] = str(path)
            # checked once, now: sizes, steps, guidance, the images' formats and dimensions
            from ..config import SamplingParams

            params = SamplingParams.from_kwargs(parsed.prompt, **parsed.fields, **inputs)
            generator.pipeline.validate_request(params)
        except InvalidRequestError as exc:
            for path in inputs.values():
                Path(path).unlink(missing_ok=True)
            raise APIError(400, str(exc), exc.field, "invalid_value") from None
        job = Job(id=job_id, status=QUEUED, model=parsed.model, prompt=parsed.prompt, seconds=parsed.seconds,
                  size=parsed.size, request={"prompt": parsed.prompt, **parsed.fields}, inputs=inputs,
                  created_at=time.time())
        store.add(job)  # committed: from here on the job is never lost
        loop.wake()
        return JSONResponse(video_object(job), headers={"openai-poll-after-ms": str(settings.poll_after_ms)})

    @app.get("/v1/videos/{video_id}")
    async def retrieve_video(video_id: str):
        job = _job_or_404(video_id)
        headers = {"openai-poll-after-ms": str(settings.poll_after_ms)} if job.status in (QUEUED, IN_PROGRESS) else {}
        return JSONResponse(video_object(job), headers=headers)

    @app.get("/v1/videos")
    async def list_videos(after: str | None = None, limit: int = 20, order: str = "desc"):
        if not 1 <= limit <= MAX_PAGE:
            raise APIError(400, f"limit: got {limit} (allowed: 1..{MAX_PAGE})", "limit", "invalid_value")
        if order not in ("asc", "desc"):
            raise APIError(400, f"order: got {order[:20]!r} (allowed: asc, desc)", "order", "invalid_value")
        try:
            jobs, more = store.page(after, limit, order)
        except KeyError:
            raise APIError(404, f"after: no video with id {str(after)[:64]!r}", "after", "not_found") from None
        data = [video_object(j) for j in jobs]
        return {"object": "list", "data": data, "has_more": more, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}

    @app.get("/v1/videos/{video_id}/content")
    async def download_video(video_id: str, variant: str = "video"):
        job = _job_or_404(video_id)
        if variant != "video":
            raise APIError(400, f"variant: got {variant[:20]!r} (allowed: video)", "variant", "invalid_value")
        if job.status != COMPLETED or not job.output or not os.path.exists(job.output):
            raise APIError(409 if job.status in (QUEUED, IN_PROGRESS) else 404,
                           f"video {job.id} is {job.status}: no content", "video_id", "not_ready")
        return FileResponse(job.output, media_type="video/mp4", filename=f"{job.id}.mp4")

    @app.post("/v1/videos/{video_id}/cancel")
    async def cancel_video(video_id: str):
        _job_or_404(video_id)
        job = store.request_cancel(video_id)
        loop.cancel(video_id)
        return video_object(job)

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(video_id: str):
        job = _job_or_404(video_id)
        store.request_cancel(video_id)  # a running job stops at its next unit
        loop.cancel(video_id)
        store.delete(video_id)
        for path in [job.output, *job.inputs.values()]:
            if path:
                Path(path).unlink(missing_ok=True)
        return {"id": video_id, "deleted": True, "object": "video.deleted"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "vidloom"}]}

    page = (Path(__file__).parent / "static" / "index.html").read_text()

    @app.get("/", include_in_schema=False)
    async def index():
        """The web page: a prompt (and an image), the queue with live progress, the videos."""
        return Response(page, media_type="text/html; charset=utf-8")

    @app.get("/health")
    async def health():
        return {"status": "ok", "jobs": store.counts()}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")
