"""The HTTP API of ``vidloom serve``: the OpenAI Videos API (``/v1/videos``) as the official
``openai`` client speaks it, plus ``/v1/models``, ``/health`` and Prometheus ``/metrics``.

:func:`create_app` wires the pieces: the ``Service`` (engine, store, engine loop, settings) on
``app.state``, no module globals; the routes (``routes``); reading bodies (``bodies``); the guard
every request passes first (API key, or without one the Host and Origin) and the error objects.
Needs the ``serve`` extra (``pip install 'vidloom[serve]'``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import ipaddress
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from . import openapi
from .bodies import MAX_UPLOAD_BYTES, BodyLimit  # noqa: F401 - MAX_UPLOAD_BYTES: part of this module's API
from .routes import router
from .service import APIError, ServeSettings, Service
from .engine import Engine
from .store import JobStore, SQLiteJobStore, StoreUnavailable

RETRY_AFTER_S = 5  # the Retry-After of a 503/507 while the store is unavailable
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")

__all__ = ["ServeSettings", "create_app", "open_store", "is_loopback", "MAX_UPLOAD_BYTES"]


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    """The OpenAI error object, for every 4xx and 5xx the server gives."""
    body = {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


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


@dataclass(frozen=True)
class Page:
    """The web page and the headers it is served with."""

    html: str
    headers: dict[str, str]


def create_app(generator: Engine, settings: ServeSettings, store: JobStore | None = None, start_loop: bool = True,
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
    loop = EngineLoop(generator, store, data_dir / "videos", Metrics(registry, store), max_active=settings.max_active,
                      batch_steps=settings.batch_steps, ranks=ranks)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if start_loop:
            loop.start()
        yield
        loop.stop()

    app = FastAPI(title="vidloom", lifespan=lifespan, openapi_tags=openapi.TAGS)
    app.state.service = Service(generator, store, loop, settings, data_dir)
    app.state.generator, app.state.store, app.state.loop, app.state.settings = generator, store, loop, settings
    app.state.recovered, app.state.registry = recovered, registry
    app.state.hosts = {h.strip("[]").lower() for h in (*LOOPBACK_NAMES, *settings.allowed_hosts)}
    html = (Path(__file__).parent / "static" / "index.html").read_text()
    app.state.page = Page(html, {"Content-Security-Policy": _page_policy(html), "X-Frame-Options": "DENY",
                                 "Referrer-Policy": "no-referrer", "Cross-Origin-Opener-Policy": "same-origin"})
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.middleware("http")(guard)
    for kind, handler in ((APIError, api_error), (Exception, internal_error), (StoreUnavailable, store_unavailable),
                          (RequestValidationError, invalid_parameters), (StarletteHTTPException, http_error)):
        app.add_exception_handler(kind, handler)
    app.include_router(router)
    app.openapi = lambda: _document(app)
    return app


def _document(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        app.openapi_schema = openapi.without_422(FastAPI.openapi(app))
    return app.openapi_schema


async def guard(request: Request, call_next):
    """Every request, before any route reads anything: the key first (constant-time), or without
    one where the request comes from; then the declared body size."""
    settings: ServeSettings = request.app.state.settings
    if settings.api_key is not None:
        if request.url.path not in ("/health", "/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
                return error_response(401, "missing or wrong API key (Authorization: Bearer KEY)", None,
                                      "invalid_api_key")
    else:
        # no key: the server's answers are for this machine's own pages and programs only. A foreign
        # Host is DNS rebinding; a foreign Origin is another site's page (a cross-site form post
        # needs no preflight)
        refused = _foreign_origin(request, request.app.state.hosts)
        if refused:
            return error_response(403, refused, None, "forbidden_origin")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
        return error_response(413, f"the request body is larger than {settings.max_body_bytes} bytes", None,
                              "too_large")
    response = await call_next(request)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    return response


async def api_error(request, exc: APIError):
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)


async def internal_error(request, exc: Exception):
    return error_response(500, "internal server error (logged)", None, "internal_error")


async def store_unavailable(request, exc: StoreUnavailable):
    # nothing was accepted: the client may send the same request again later
    return error_response(507 if exc.full else 503, "the job store is unavailable now (disk full, database down or "
                          "busy); nothing was recorded: try again later", None,
                          "insufficient_storage" if exc.full else "store_unavailable",
                          {"Retry-After": str(RETRY_AFTER_S)})


async def invalid_parameters(request, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {}
    name = str(first.get("loc", ("", "?"))[-1])[:60]
    return error_response(400, f"{name}: {first.get('msg', 'invalid')}", name, "invalid_value")


async def http_error(request: Request, exc: StarletteHTTPException):
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # every method the path takes, not only the first route's
        allowed = set()
        for route in router.routes:  # the API's own routes (the app holds them as one included router)
            match, _ = route.matches({**request.scope, "method": "GET"})
            if match is not Match.NONE and getattr(route, "methods", None):
                allowed |= route.methods
        headers["Allow"] = ", ".join(sorted(allowed))
    return error_response(exc.status_code, str(exc.detail), None,
                          {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code), headers)


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
