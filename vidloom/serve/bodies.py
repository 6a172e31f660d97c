"""Reading a request's body for ``vidloom serve``, bounded: a size limit counted as bytes arrive
(chunked bodies too), a deadline for the whole body, and a multipart parser that refuses text it
cannot decode. ``read_request`` gives the form or JSON values and the uploaded files.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import Request
from starlette.formparsers import MultiPartException, MultiPartParser

from .requests import UPLOADS
from .service import APIError

MAX_UPLOAD_BYTES = 32 * 1024 * 1024  # one image
MAX_FORM_FIELDS = 64


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


async def read_request(request: Request, max_body_bytes: int) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The request's fields and uploads (multipart, as the openai client sends, or JSON); a
    malformed, oversized or late body is an APIError (400, 413, 408), a foreign type 415."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        return _json_values(await _body(request, max_body_bytes)), {}
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
            if name in LORA_FORM_KEYS and not hasattr(value, "read"):  # the openai client's form of a list
                _add_lora_item(values, LORA_FORM_KEYS[name], value)
                continue
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
    _lora_items(values)
    return values, files


# the openai client sends extra_body={"lora": [{"name": ..., "scale": ...}]} in a multipart form as
# the repeated field "lora[][name]" (every item's name, in order), then "lora[][scale]" (every
# item's scale): paired by position, so the items give a scale each, or none does (scale 1.0)
LORA_FORM_KEYS = {"lora[][name]": "name", "lora[][scale]": "scale"}
MAX_LORA_ITEMS = 16


def _add_lora_item(values: dict[str, Any], part: str, value: str) -> None:
    """One "lora[][name]" or "lora[][scale]" form field, kept in ``values["lora"]`` as a
    {"name": [...], "scale": [...]} record until ``_lora_items`` pairs them."""
    record = values.setdefault("lora", {"name": [], "scale": []})
    if not isinstance(record, dict) or len(record[part]) >= MAX_LORA_ITEMS:
        raise APIError(400, f"lora: given twice, or more than {MAX_LORA_ITEMS} adapters", "lora", "invalid_value")
    record[part].append(value)


def _lora_items(values: dict[str, Any]) -> None:
    """``values["lora"]`` from its form record -> [{"name", "scale"}, ...]."""
    record = values.get("lora")
    if not isinstance(record, dict):
        return
    names, scales = record["name"], record["scale"]
    if scales and len(scales) != len(names):
        raise APIError(400, f"lora: {len(names)} names and {len(scales)} scales (give each adapter a scale, or none)",
                       "lora", "invalid_value")
    try:
        values["lora"] = [{"name": n, "scale": float(s)} for n, s in zip(names, scales or ["1"] * len(names))]
    except ValueError:
        raise APIError(400, "lora: a scale is not a number", "lora", "invalid_value") from None


def _json_values(body: bytes) -> dict[str, Any]:
    try:
        values = json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser goes
        raise APIError(400, f"the body is not valid JSON: {str(exc)[:200]}", None, "invalid_json") from None
    if not isinstance(values, dict):
        raise APIError(400, "the JSON body must be an object", None, "invalid_json")
    for name in UPLOADS:
        if name in values:
            raise APIError(400, f"{name}: send images as multipart/form-data uploads", name, "invalid_value")
    return values


async def _body(request: Request, max_body_bytes: int) -> bytes:
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise BodyTooLarge(f"the request body is larger than {max_body_bytes} bytes")
            chunks.append(chunk)
    except BodyTooLarge as exc:
        raise APIError(413, str(exc), None, "too_large") from None
    except BodyTimeout as exc:
        raise APIError(408, str(exc), None, "timeout") from None
    return b"".join(chunks)
