"""What the routes of ``vidloom serve`` work with: its settings, the ``Service`` object that
holds the engine, the store and the engine loop (one per app, on ``app.state``; no module
globals), the API error and the OpenAI ``Video`` object.
"""

from __future__ import annotations

import errno
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidRequestError
from .requests import UPLOADS, parse
from .engine import Engine
from .store import FAILED, QUEUED, Job, JobStore, StoreUnavailable

DECODES_AT_ONCE = 2  # uploaded images checked (decoded) at the same time: bounds their memory
MAX_BODY_BYTES = 64 * 1024 * 1024  # a request, uploads included
BODY_TIMEOUT_S = 120.0  # a whole request body, however slowly a client sends it


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
    # per adapter name, the settings it was trained for (over ``defaults`` for requests naming it)
    adapter_defaults: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()


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
    video = {
        "id": job.id, "object": "video", "model": job.model, "status": job.status, "progress": job.progress,
        "created_at": int(job.created_at), "completed_at": None if job.completed_at is None else int(job.completed_at),
        "expires_at": None, "error": error, "prompt": job.prompt, "seconds": job.seconds, "size": job.size,
        "remixed_from_video_id": None,
    }
    if job.report:  # a request with a feature cache: what it computed and skipped (``VideoOutput.cache``)
        video["cache"] = job.report
    return video


@dataclass
class Service:
    """One server's engine (``generator``, the ``engine.Engine`` interface), job store, engine
    loop and settings; the routes reach it through ``app.state.service``."""

    generator: Engine
    store: JobStore
    loop: Any  # scheduler.EngineLoop
    settings: ServeSettings
    data_dir: Path
    decodes: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(DECODES_AT_ONCE))

    def job_or_404(self, video_id: str) -> Job:
        job = self.store.get(video_id) if len(video_id) <= 64 else None
        if job is None:
            raise APIError(404, f"no video with id {video_id[:64]!r}", "video_id", "not_found")
        return job

    def accept(self, values: dict[str, Any], files: dict[str, bytes]) -> Job:
        """Check a request once (sizes, steps, the images' formats and dimensions: ``generator.check``),
        keep its uploads and record it; the checked request (its images decoded) waits for the
        engine loop in ``loop.waiting``. Called in a worker thread: image decoding and store writes
        stay off the event loop. Until the job is recorded, nothing of it stays behind (no
        orphaned upload, no waiting request)."""
        settings = self.settings
        if self.store.counts()[QUEUED] >= settings.max_queue:
            raise APIError(429, f"the queue is full ({settings.max_queue} jobs waiting)", None, "queue_full",
                           headers={"Retry-After": "30"})
        job_id = f"video_{secrets.token_hex(12)}"
        inputs = {}
        try:
            parsed = parse(values, settings.model_name, dict(settings.defaults),
                           {name: dict(d) for name, d in settings.adapter_defaults})
            for name, data in files.items():
                path = self.data_dir / "inputs" / f"{job_id}.{name}"  # server-made name: no user input in a path
                inputs[UPLOADS[name]] = str(path)
                path.write_bytes(data)
            job = Job(id=job_id, status=QUEUED, model=parsed.model, prompt=parsed.prompt, seconds=parsed.seconds,
                      size=parsed.size, request={"prompt": parsed.prompt, **parsed.fields}, inputs=inputs,
                      created_at=time.time())
            with self.decodes:
                checked = self.generator.check(job.prompt, **job.sampling())
            # waiting before the job is recorded: the loop may claim it as soon as it is
            self.loop.waiting.put(job_id, checked)
            self.store.add(job)  # committed: from here on the job is never lost
        except BaseException as exc:
            self.loop.waiting.take(job_id)
            for path in inputs.values():
                Path(path).unlink(missing_ok=True)
            if isinstance(exc, InvalidRequestError):
                raise APIError(400, str(exc), exc.field, "invalid_value") from None
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreUnavailable(f"the data folder is full: {exc.strerror}", full=True) from None
            raise
        return job
