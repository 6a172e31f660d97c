"""What the OpenAPI document of ``vidloom serve`` says about each route: the request bodies it
takes (multipart or JSON, built from the request fields of ``requests``), the objects it
returns and every error status it can answer, each with the OpenAI error object. The routes
validate by hand (``requests.parse``); these models only describe.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from .requests import FIELDS, LORA_FIELD, UPLOADS

TAGS = [{"name": "videos", "description": "the OpenAI Videos API"},
        {"name": "models", "description": "the model this server runs"},
        {"name": "service", "description": "health and Prometheus metrics"}]


class ErrorDetail(BaseModel):
    message: str
    type: Literal["invalid_request_error", "server_error"]
    param: str | None = None
    code: str | None = None


class ErrorObject(BaseModel):
    error: ErrorDetail


class VideoError(BaseModel):
    code: str
    message: str


class Video(BaseModel):
    id: str
    object: Literal["video"]
    model: str
    status: Literal["queued", "in_progress", "completed", "failed"]
    progress: int
    created_at: int
    completed_at: int | None
    expires_at: int | None
    error: VideoError | None
    prompt: str
    seconds: str
    size: str
    remixed_from_video_id: str | None


class VideoList(BaseModel):
    object: Literal["list"]
    data: list[Video]
    has_more: bool
    first_id: str | None
    last_id: str | None


class VideoDeleted(BaseModel):
    id: str
    deleted: bool
    object: Literal["video.deleted"]


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class Health(BaseModel):
    status: Literal["ok"]
    jobs: dict[str, int]


_ERRORS = {
    400: "a field is invalid (the error's param names it)",
    401: "missing or wrong API key",
    403: "without an API key: a foreign Host or Origin",
    404: "no such video, or no such route",
    405: "method not allowed (Allow lists the allowed ones)",
    408: "the request body did not arrive in time",
    409: "the video is not finished yet",
    413: "the body or an upload is too large",
    415: "neither multipart/form-data nor application/json",
    429: "the queue is full (Retry-After)",
    503: "the job store is unavailable now (Retry-After); nothing was recorded",
    507: "the data folder is full (Retry-After); nothing was recorded",
}
_ALWAYS = (401, 403, 503)


def _responses(*statuses: int, ok: Any = None, ok_content: dict | None = None) -> dict:
    responses: dict[int | str, dict] = {}
    if ok is not None or ok_content is not None:
        responses[200] = {"description": "OK"}
        if ok is not None:
            responses[200]["model"] = ok
        if ok_content is not None:
            responses[200]["content"] = ok_content
    for status in sorted({*statuses, *_ALWAYS}):
        responses[status] = {"description": _ERRORS[status], "model": ErrorObject}
    return responses


_KINDS = {str: {"type": "string"}, int: {"type": "integer"}, float: {"type": "number"}}


def _create_body() -> dict:
    fields = {"prompt": {"type": "string", "maxLength": 20_000},
              "model": {"type": "string"},
              "seconds": {"type": "string", "description": "seconds of video, e.g. \"4\""},
              "size": {"type": "string", "description": "WIDTHxHEIGHT, e.g. \"832x480\""}}
    fields |= {name: dict(_KINDS[kind]) for name, (kind, _) in FIELDS.items()}
    fields[LORA_FIELD] = {"type": "array", "maxItems": 16, "description": "LoRA adapters the server loaded "
                          "(GET /v1/models lists them), each with its scale; in a form, this list as JSON",
                          "items": {"type": "object", "required": ["name"],
                                    "properties": {"name": {"type": "string"}, "scale": {"type": "number"}}}}
    uploads = {name: {"type": "string", "format": "binary", "description": f"an image: the request's {field}"}
               for name, field in UPLOADS.items()}
    return {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["prompt"],
                                           "properties": fields | uploads}},
        "application/json": {"schema": {"type": "object", "required": ["prompt"], "properties": fields,
                                        "additionalProperties": False}},
    }}


CREATE = {"summary": "Create a video job", "openapi_extra": {"requestBody": _create_body()},
          "responses": _responses(400, 408, 413, 415, 429, 507, ok=Video)}
VIDEO = {"responses": _responses(404, ok=Video)}
LIST = {"summary": "List video jobs", "responses": _responses(400, 404, ok=VideoList)}
CONTENT = {"summary": "Download a finished video",
           "responses": _responses(400, 404, 409, ok_content={"video/mp4": {"schema": {"type": "string",
                                                                                      "format": "binary"}}})}
DELETED = {"summary": "Delete a video job and its files", "responses": _responses(404, ok=VideoDeleted)}
MODELS = {"summary": "The model served", "responses": _responses(ok=ModelList)}
HEALTH = {"summary": "Liveness and job counts (no API key needed)",
          "responses": {k: v for k, v in _responses(ok=Health).items() if k != 401}}
METRICS = {"summary": "Prometheus metrics (text exposition format)",
           "responses": _responses(ok_content={"text/plain": {"schema": {"type": "string"}}})}


def without_422(schema: dict) -> dict:
    """Requests are validated by hand (400 with the OpenAI error object): drop FastAPI's automatic
    422 entries and the schemas only they use."""
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return schema
