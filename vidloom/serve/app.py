"""The HTTP API of ``vidloom serve``: the OpenAI Videos API (``/v1/videos``) as the official
``openai`` client speaks it, plus ``/v1/models``, ``/health`` and Prometheus ``/metrics``.

Everything the app needs lives on ``app.state`` (the generator, the store, the engine loop, the
settings), made by :func:`create_app`; no module globals. Needs the ``serve`` extra
(``pip install 'vidloom[serve]'``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.routing import Match

from ..errors import InvalidRequestError
from . import openapi
from .requests import UPLOADS, parse
from .store import COMPLETED, FAILED, IN_PROGRESS, QUEUED, Job, JobStore, SQLiteJobStore, StoreUnavailable

MAX_BODY_BYTES = 64 * 1024 * 1024  # a request, uploads included
MAX_UPLOAD_BYTES = 32 * 1024 * 1024  # one image
MAX_FORM_FIELDS = 64
MAX_PAGE = 100
BODY_TIMEOUT_S = 120.0  # a whole request body, however slowly a client sends it
DECODES_AT_ONCE = 2  # uploaded images checked (decoded) at the same time: bounds their memory
RETRY_AFTER_S = 5  # the Retry-After of a 503/507 while the store is unavailable
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


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
    body_timeout_s: float = BODY_TIMEOUT_S  # a body not received whole by then is cut off (408)
    # without an API key: the Host names the server answers to (DNS rebinding is refused); loopback
    # names are always allowed, the --host it binds is added by the CLI
    allowed_hosts: tuple[str, ...] = ()
    defaults: tuple[tuple[str, Any], ...] = ()


class BodyTooLarge(Exception):
    """The body passed ``max_body_bytes`` while being read (a chunked body has no Content-Length)."""


class BodyTimeout(Exception):
    """The body did not arrive whole within ``body_timeout_s`` (a client trickling bytes)."""


class BodyLimit:
    """ASGI middleware: counts every request's body bytes as they arrive and stops reading past the
    limit, so a chunked upload cannot fill the disk where the form parser spools files; a body
    must arrive whole within ``timeout_s``, so a slow client cannot hold a request open."""

    def __init__(self, app, limit: int, timeout_s: float):
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen, whole = 0, False
        deadline = time.monotonic() + self.timeout_s

        async def limited():
            nonlocal seen, whole
            if whole:  # after the body: waiting for a disconnect while a response streams is not bounded
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise BodyTimeout(f"the request body did not arrive within {self.timeout_s:g} s") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                whole = not message.get("more_body", False)
                if seen > self.limit:
                    raise BodyTooLarge(f"the request body is larger than {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


class StrictMultiPartParser(MultiPartParser):
    """Starlette's form parser, except that a text field that is not valid in its charset is an
    error naming the field (Starlette falls back to Latin-1, silently changing the text)."""

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            charset = self._charset or "utf-8"
            try:
                bytes(part.data).decode(charset)
            except (UnicodeDecodeError, LookupError):
                raise MultiPartException(f"{part.field_name[:60]}: not valid {charset} text") from None
        super().on_part_end()


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    """The OpenAI error object, for every 4xx and 5xx the server gives."""
    body = {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


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


def open_store(data_dir: Path, store: str | None = None, lease_s: float | None = None) -> JobStore:
    """The data folder made ready and the job store opened: SQLite in ``data_dir`` (held
    exclusively), or PostgreSQL at ``store``. What stops it (a read-only or corrupt store, a
    file where the folder should be, a second server, a database that refuses) is a ValueError
    naming the option, in one line."""
    import sqlite3

    data_dir = Path(data_dir)
    _make_folders(data_dir)
    if store is not None:
        from .pg_store import PostgresJobStore

        try:
            return PostgresJobStore(store, **({} if lease_s is None else {"lease_s": lease_s}))
        except (StoreUnavailable, ValueError) as exc:  # one line, without the password
            raise ValueError(f"--store: {exc}") from None
    try:
        return SQLiteJobStore(data_dir / "jobs.sqlite3")
    except (sqlite3.Error, StoreUnavailable, OSError) as exc:
        raise ValueError(f"--data-dir {data_dir}: the job store jobs.sqlite3 cannot be opened ({exc})") from None


def _make_folders(data_dir: Path) -> None:
    try:
        for sub in ("videos", "inputs"):
            (data_dir / sub).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--data-dir {data_dir}: cannot make its folders ({exc.strerror or exc})") from None


def create_app(generator, settings: ServeSettings, store: JobStore | None = None, start_loop: bool = True,
               ranks=None):
    """The FastAPI app serving ``generator``; the store defaults to ``data_dir/jobs.sqlite3``
    (held exclusively: a second server on the same folder is refused); ``ranks``:
    ``scheduler.RankBroadcast`` on rank 0 of a multi-process server."""
    from .scheduler import EngineLoop, Metrics

    data_dir = Path(settings.data_dir)
    _make_folders(data_dir)
    store = store or open_store(data_dir)
    recovered = store.recover()
    registry = CollectorRegistry()
    metrics = Metrics(registry, store)
    loop = EngineLoop(generator, store, data_dir / "videos", metrics, max_active=settings.max_active,
                      batch_steps=settings.batch_steps, ranks=ranks)
    decodes = threading.BoundedSemaphore(DECODES_AT_ONCE)
    hosts = {h.strip("[]").lower() for h in (*LOOPBACK_NAMES, *settings.allowed_hosts)}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if start_loop:
            loop.start()
        yield
        loop.stop()

    app = FastAPI(title="vidloom", lifespan=lifespan, openapi_tags=openapi.TAGS)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.state.generator, app.state.store, app.state.loop, app.state.settings = generator, store, loop, settings
    app.state.recovered = recovered

    def document():
        if app.openapi_schema is None:
            app.openapi_schema = openapi.without_422(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = document

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        return error_response(500, "internal server error (logged)", None, "internal_error")

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(request, exc: StoreUnavailable):
        # nothing was accepted: the client may send the same request again later
        return error_response(507 if exc.full else 503, "the job store is unavailable now (disk full, database "
                              "down or busy); nothing was recorded: try again later", None,
                              "insufficient_storage" if exc.full else "store_unavailable",
                              {"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(RequestValidationError)
    async def invalid_parameters(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        name = str(first.get("loc", ("", "?"))[-1])[:60]
        return error_response(400, f"{name}: {first.get('msg', 'invalid')}", name, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # every method the path takes, not only the first route's
            allowed = set()
            for route in app.router.routes:
                match, _ = route.matches({**request.scope, "method": "GET"})
                if match is not Match.NONE and getattr(route, "methods", None):
                    allowed |= route.methods
            headers["Allow"] = ", ".join(sorted(allowed))
        return error_response(exc.status_code, str(exc.detail), None, {404: "not_found", 405: "method_not_allowed"}
                              .get(exc.status_code), headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        # the key first (constant-time), then where the request comes from, then the body size,
        # before any route reads anything
        if settings.api_key is not None:
            if request.url.path not in ("/health", "/"):
                given = request.headers.get("authorization", "")
                expected = f"Bearer {settings.api_key}"
                if not hmac.compare_digest(given.encode(), expected.encode()):
                    return error_response(401, "missing or wrong API key (Authorization: Bearer KEY)", None,
                                          "invalid_api_key")
        else:
            # no key: the server's answers are for this machine's own pages and programs only. A
            # foreign Host is DNS rebinding; a foreign Origin is another site's page (a cross-site
            # form post needs no preflight)
            refused = _foreign_origin(request, hosts)
            if refused:
                return error_response(403, refused, None, "forbidden_origin")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            return error_response(413, f"the request body is larger than {settings.max_body_bytes} bytes", None,
                                  "too_large")
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

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
            except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser goes
                raise APIError(400, f"the body is not valid JSON: {str(exc)[:200]}", None, "invalid_json") from None
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
            form = await StrictMultiPartParser(request.headers, request.stream(), max_files=len(UPLOADS),
                                               max_fields=MAX_FORM_FIELDS, max_part_size=MAX_UPLOAD_BYTES).parse()
        except BodyTooLarge as exc:
            raise APIError(413, str(exc), None, "too_large") from None
        except BodyTimeout as exc:
            raise APIError(408, str(exc), None, "timeout") from None
        except MultiPartException as exc:
            raise APIError(400, f"malformed multipart body: {exc.message[:200]}", None, "invalid_multipart") from None
        except Exception as exc:  # noqa: BLE001 - a malformed or oversized form is the client's error
            raise APIError(400, f"malformed multipart body: {str(exc)[:200]}", None, "invalid_multipart") from None
        values, files = {}, {}
        try:
            for name, value in form.multi_items():
                if name in values or name in files:
                    raise APIError(400, f"{name[:60]}: given twice", name[:60], "invalid_value")
                if hasattr(value, "read"):  # an upload
                    if name not in UPLOADS:
                        raise APIError(400, f"{name[:60]}: unexpected file (files: {', '.join(UPLOADS)})",
                                       name[:60], "invalid_value")
                    data = await value.read(MAX_UPLOAD_BYTES + 1)
                    if len(data) > MAX_UPLOAD_BYTES:
                        raise APIError(413, f"{name}: larger than {MAX_UPLOAD_BYTES} bytes", name, "too_large")
                    files[name] = data
                else:
                    values[name] = value
        finally:
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
        except BodyTimeout as exc:
            raise APIError(408, str(exc), None, "timeout") from None
        return b"".join(chunks)

    def _accept(values: dict[str, Any], files: dict[str, bytes]) -> Job:
        """Check a request (sizes, steps, the images' formats and dimensions), keep its uploads and
        record it; in a worker thread: image decoding and store writes stay off the event loop.
        Until the job is recorded, nothing of it stays behind (no orphaned upload)."""
        from ..config import SamplingParams

        if store.counts()[QUEUED] >= settings.max_queue:
            raise APIError(429, f"the queue is full ({settings.max_queue} jobs waiting)", None, "queue_full",
                           headers={"Retry-After": "30"})
        job_id = f"video_{secrets.token_hex(12)}"
        inputs = {}
        try:
            parsed = parse(values, settings.model_name, dict(settings.defaults))
            for name, data in files.items():
                path = data_dir / "inputs" / f"{job_id}.{name}"  # server-made name: no user input in a path
                inputs[UPLOADS[name]] = str(path)
                path.write_bytes(data)
            params = SamplingParams.from_kwargs(parsed.prompt, **parsed.fields, **inputs)
            with decodes:
                generator.pipeline.validate_request(params)
            job = Job(id=job_id, status=QUEUED, model=parsed.model, prompt=parsed.prompt, seconds=parsed.seconds,
                      size=parsed.size, request={"prompt": parsed.prompt, **parsed.fields}, inputs=inputs,
                      created_at=time.time())
            store.add(job)  # committed: from here on the job is never lost
        except BaseException as exc:
            for path in inputs.values():
                Path(path).unlink(missing_ok=True)
            if isinstance(exc, InvalidRequestError):
                raise APIError(400, str(exc), exc.field, "invalid_value") from None
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreUnavailable(f"the data folder is full: {exc.strerror}", full=True) from None
            raise
        return job

    @app.post("/v1/videos", tags=["videos"], **openapi.CREATE)
    async def create_video(request: Request):
        values, files = await _read_request(request)
        job = await run_in_threadpool(_accept, values, files)
        loop.wake()
        return JSONResponse(video_object(job), headers={"openai-poll-after-ms": str(settings.poll_after_ms)})

    @app.get("/v1/videos/{video_id}", tags=["videos"], **openapi.VIDEO)
    def retrieve_video(video_id: str):
        job = _job_or_404(video_id)
        headers = {"openai-poll-after-ms": str(settings.poll_after_ms)} if job.status in (QUEUED, IN_PROGRESS) else {}
        return JSONResponse(video_object(job), headers=headers)

    @app.get("/v1/videos", tags=["videos"], **openapi.LIST)
    def list_videos(after: str | None = None, limit: int = 20, order: str = "desc"):
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

    @app.get("/v1/videos/{video_id}/content", tags=["videos"], **openapi.CONTENT)
    def download_video(video_id: str, variant: str = "video"):
        job = _job_or_404(video_id)
        if variant != "video":
            raise APIError(400, f"variant: got {variant[:20]!r} (allowed: video)", "variant", "invalid_value")
        if job.status != COMPLETED or not job.output or not os.path.exists(job.output):
            raise APIError(409 if job.status in (QUEUED, IN_PROGRESS) else 404,
                           f"video {job.id} is {job.status}: no content", "video_id", "not_ready")
        return FileResponse(job.output, media_type="video/mp4", filename=f"{job.id}.mp4")

    @app.post("/v1/videos/{video_id}/cancel", tags=["videos"], **openapi.VIDEO)
    def cancel_video(video_id: str):
        _job_or_404(video_id)
        job = store.request_cancel(video_id)
        loop.cancel(video_id)
        return video_object(job)

    @app.delete("/v1/videos/{video_id}", tags=["videos"], **openapi.DELETED)
    def delete_video(video_id: str):
        job = _job_or_404(video_id)
        store.request_cancel(video_id)  # a running job stops at its next unit
        loop.cancel(video_id)
        store.delete(video_id)
        for path in [job.output, *job.inputs.values()]:
            if path:
                Path(path).unlink(missing_ok=True)
        return {"id": video_id, "deleted": True, "object": "video.deleted"}

    @app.get("/v1/models", tags=["models"], **openapi.MODELS)
    def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "vidloom"}]}

    page = (Path(__file__).parent / "static" / "index.html").read_text()
    page_headers = {"Content-Security-Policy": _page_policy(page), "X-Frame-Options": "DENY",
                    "Referrer-Policy": "no-referrer", "Cross-Origin-Opener-Policy": "same-origin"}

    @app.get("/", include_in_schema=False)
    async def index():
        """The web page: a prompt (and an image), the queue with live progress, the videos."""
        return Response(page, media_type="text/html; charset=utf-8", headers=page_headers)

    @app.get("/health", tags=["service"], **openapi.HEALTH)
    def health():
        return {"status": "ok", "jobs": store.counts()}

    @app.get("/metrics", tags=["service"], response_class=Response, **openapi.METRICS)
    def prometheus():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _page_policy(page: str) -> str:
    """The web page's Content-Security-Policy: its own inline script and style (by hash) and this
    server, nothing else; never framed."""

    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in bodies)

    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
            "connect-src 'self'; media-src 'self' blob:; img-src 'self' blob: data:; form-action 'self'; "
            "base-uri 'none'; frame-ancestors 'none'")


def _foreign_origin(request: Request, hosts: set[str]) -> str | None:
    """Why a request to a keyless server is refused, or None: its Host must name this server (a
    loopback name or one it was told to serve), and an Origin, when sent, must be the same."""
    host = request.headers.get("host", "")
    name = urlsplit(f"//{host}").hostname or ""
    if name.lower() not in hosts:
        return f"Host {host[:80]!r} is not a name of this server (without an API key it answers only to " \
               f"{', '.join(sorted(hosts))})"
    origin = request.headers.get("origin")
    if origin is not None:
        parts = urlsplit(origin)
        if parts.netloc.lower() != host.lower() or parts.scheme not in ("http", "https"):
            return f"Origin {origin[:80]!r} is another site: a server without an API key answers only its own page"
    return None


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address (a name is resolved: what it
    spells does not count)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    addresses = {info[4][0].split("%")[0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)
