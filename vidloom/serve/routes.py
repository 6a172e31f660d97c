"""The routes of ``vidloom serve``: the OpenAI Videos API (``/v1/videos``), ``/v1/models``,
``/health``, ``/metrics`` and the web page. Each is a plain function of its parameters and the
app's ``Service``; the ones that touch the store run in worker threads (plain ``def``), so a
slow or locked store never stalls the event loop.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from . import openapi
from .bodies import read_request
from .service import APIError, Service, video_object
from .store import COMPLETED, IN_PROGRESS, QUEUED

MAX_PAGE = 100

router = APIRouter()


def service(request: Request) -> Service:
    return request.app.state.service


def _poll_hint(svc: Service) -> dict[str, str]:
    return {"openai-poll-after-ms": str(svc.settings.poll_after_ms)}


@router.post("/v1/videos", tags=["videos"], **openapi.CREATE)
async def create_video(request: Request, svc: Service = Depends(service)):
    values, files = await read_request(request, svc.settings.max_body_bytes)
    job = await run_in_threadpool(svc.accept, values, files)
    svc.loop.wake()
    return JSONResponse(video_object(job), headers=_poll_hint(svc))


@router.get("/v1/videos/{video_id}", tags=["videos"], **openapi.VIDEO)
def retrieve_video(video_id: str, svc: Service = Depends(service)):
    job = svc.job_or_404(video_id)
    return JSONResponse(video_object(job), headers=_poll_hint(svc) if job.status in (QUEUED, IN_PROGRESS) else {})


@router.get("/v1/videos", tags=["videos"], **openapi.LIST)
def list_videos(after: str | None = None, limit: int = 20, order: str = "desc", svc: Service = Depends(service)):
    if not 1 <= limit <= MAX_PAGE:
        raise APIError(400, f"limit: got {limit} (allowed: 1..{MAX_PAGE})", "limit", "invalid_value")
    if order not in ("asc", "desc"):
        raise APIError(400, f"order: got {order[:20]!r} (allowed: asc, desc)", "order", "invalid_value")
    try:
        jobs, more = svc.store.page(after, limit, order)
    except KeyError:
        raise APIError(404, f"after: no video with id {str(after)[:64]!r}", "after", "not_found") from None
    data = [video_object(j) for j in jobs]
    return {"object": "list", "data": data, "has_more": more, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


@router.get("/v1/videos/{video_id}/content", tags=["videos"], **openapi.CONTENT)
def download_video(video_id: str, variant: str = "video", svc: Service = Depends(service)):
    job = svc.job_or_404(video_id)
    if variant != "video":
        raise APIError(400, f"variant: got {variant[:20]!r} (allowed: video)", "variant", "invalid_value")
    if job.status != COMPLETED or not job.output or not os.path.exists(job.output):
        raise APIError(409 if job.status in (QUEUED, IN_PROGRESS) else 404,
                       f"video {job.id} is {job.status}: no content", "video_id", "not_ready")
    return FileResponse(job.output, media_type="video/mp4", filename=f"{job.id}.mp4")


@router.post("/v1/videos/{video_id}/cancel", tags=["videos"], **openapi.VIDEO)
def cancel_video(video_id: str, svc: Service = Depends(service)):
    svc.job_or_404(video_id)
    job = svc.store.request_cancel(video_id)
    svc.loop.cancel(video_id)
    return video_object(job)


@router.delete("/v1/videos/{video_id}", tags=["videos"], **openapi.DELETED)
def delete_video(video_id: str, svc: Service = Depends(service)):
    job = svc.job_or_404(video_id)
    svc.store.request_cancel(video_id)  # a running job stops at its next unit
    svc.loop.cancel(video_id)
    svc.store.delete(video_id)
    for path in [job.output, *job.inputs.values()]:
        if path:
            Path(path).unlink(missing_ok=True)
    return {"id": video_id, "deleted": True, "object": "video.deleted"}


@router.get("/v1/models", tags=["models"], **openapi.MODELS)
def models(svc: Service = Depends(service)):
    adapters = [{"id": name, "object": "model", "created": 0, "owned_by": "vidloom", "parent": svc.settings.model_name,
                 "kind": "lora"} for name in getattr(svc.generator, "adapter_names", [])]
    return {"object": "list", "data": [{"id": svc.settings.model_name, "object": "model", "created": 0,
                                        "owned_by": "vidloom"}, *adapters]}


@router.get("/health", tags=["service"], **openapi.HEALTH)
def health(svc: Service = Depends(service)):
    return {"status": "ok", "jobs": svc.store.counts()}


@router.get("/metrics", tags=["service"], response_class=Response, **openapi.METRICS)
def prometheus(request: Request):
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
async def index(request: Request):
    """The web page: a prompt (and an image), the queue with live progress, the videos."""
    page = request.app.state.page
    return Response(page.html, media_type="text/html; charset=utf-8", headers=page.headers)
