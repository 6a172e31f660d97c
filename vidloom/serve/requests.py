"""A video request as the OpenAI Videos API sends it (multipart form or JSON) -> vidloom's request.

The OpenAI fields: ``prompt``, ``model``, ``seconds`` (a string: "4"), ``size`` ("WxH"),
``input_reference`` (an uploaded image: image-to-video). vidloom's own fields map one to one onto
``SamplingParams`` (``negative_prompt``, ``num_frames``, ``fps``, ``num_inference_steps``,
``guidance_scale``, ``guidance_scale_2``, ``seed``, ``flow_shift``, ``cache``, ``sta_window``, and ``last_image`` as a second
upload). Form values arrive as strings and are converted by the field's type; anything else is
a 400 naming the field. ``seconds`` x ``fps`` becomes the nearest 4k+1 frame count when
``num_frames`` is not given.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any

from ..config import MAX_PROMPT_CHARS, SamplingParams, check_text
from ..errors import InvalidRequestError

# the SamplingParams fields a request may set, beside the OpenAI ones
SERVED_FIELDS = ("negative_prompt", "num_frames", "fps", "num_inference_steps", "guidance_scale", "guidance_scale_2",
                 "seed", "flow_shift", "cache", "sta_window")
_ALLOWED = {str: "a string", int: "an integer", float: "a number"}


def _field_kinds() -> dict[str, tuple[type, str]]:
    """Request field -> (its SamplingParams type, what is allowed), read from the dataclass so the
    server never restates it; form strings are converted to the type."""
    hints = typing.get_type_hints(SamplingParams)
    kinds = {}
    for name in SERVED_FIELDS:
        kind = next(t for t in typing.get_args(hints[name]) or (hints[name],) if t is not type(None))
        kinds[name] = (kind, _ALLOWED[kind])
    return kinds


FIELDS: dict[str, tuple[type, str]] = _field_kinds()
OPENAI_FIELDS = ("prompt", "model", "seconds", "size")
# the adapters a request uses (``SamplingParams.lora``): a JSON list of {"name", "scale"} (in a form,
# that list as a JSON string); names of adapters the server loaded (``vidloom serve --lora-dir``)
LORA_FIELD = "lora"
MAX_LORA_CHARS = 4096
UPLOADS = {"input_reference": "image", "last_image": "last_image"}
MAX_SECONDS = 600.0


@dataclasses.dataclass
class VideoRequest:
    """A parsed request: the ``SamplingParams`` fields (JSON-safe), and what the Video object reports."""

    prompt: str
    model: str
    seconds: str
    size: str
    fields: dict[str, Any]


def _convert(name: str, value: Any, kind: type, allowed: str):
    if isinstance(value, str) and kind is not str:
        try:
            value = kind(value.strip())
        except ValueError:
            raise InvalidRequestError(name, f"got {value[:40]!r}", allowed) from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidRequestError(name, f"got {type(value).__name__}", allowed)
    if kind is float and not math.isfinite(value):
        raise InvalidRequestError(name, f"got {value}", allowed)
    return value


def _lora_field(value: Any) -> list[list]:
    """The ``lora`` field -> [[name, scale], ...] (JSON-safe, as the job store keeps it)."""
    if isinstance(value, str):  # a form field: the list as JSON
        if len(value) > MAX_LORA_CHARS:
            raise InvalidRequestError(LORA_FIELD, f"{len(value)} characters", f"at most {MAX_LORA_CHARS}")
        try:
            value = json.loads(value)
        except ValueError:
            raise InvalidRequestError(LORA_FIELD, "is not JSON", '[{"name": ..., "scale": ...}]') from None
    from ..config import _request_loras

    return [[name, scale] for name, scale in _request_loras(value)]


def parse(values: dict[str, Any], model_name: str, defaults: dict[str, Any],
          adapter_defaults: dict[str, dict] | None = None) -> VideoRequest:
    """Form or JSON values (uploads already taken out) -> a VideoRequest. Raises InvalidRequestError
    naming the field; the request is checked against the model afterwards (``SamplingParams``).
    ``adapter_defaults``: the settings each adapter was trained for (a distilled adapter's steps and
    guidance), over ``defaults`` for a request naming it; what the request gives wins."""
    unknown = sorted(set(values) - set(FIELDS) - set(OPENAI_FIELDS) - {LORA_FIELD})
    if unknown:
        allowed = ", ".join([*OPENAI_FIELDS, *UPLOADS, *FIELDS, LORA_FIELD])
        raise InvalidRequestError(unknown[0][:60], "unknown field", allowed)
    prompt = values.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequestError("prompt", "is required: a non-empty string")
    for name, kind in FIELDS.items():  # every text field: bounded and storable, before anything reads it
        if kind[0] is str and isinstance(values.get(name), str):
            check_text(name, values[name], f"a string of at most {MAX_PROMPT_CHARS} characters")
    check_text("prompt", prompt, f"a string of at most {MAX_PROMPT_CHARS} characters")
    model = values.get("model", model_name)
    if model != model_name:
        raise InvalidRequestError("model", f"got {str(model)[:60]!r}", repr(model_name))
    fields = dict(defaults)
    if values.get(LORA_FIELD) is not None:
        fields[LORA_FIELD] = _lora_field(values[LORA_FIELD])
        for name, _ in fields[LORA_FIELD]:
            fields.update((adapter_defaults or {}).get(name, {}))
    for name, (kind, allowed) in FIELDS.items():
        if name in values and values[name] is not None:
            fields[name] = _convert(name, values[name], kind, allowed)
    size = values.get("size")
    if size is not None:
        parts = str(size).lower().split("x") if len(str(size)) <= 40 else []
        # ASCII digits only: str.isdigit() is true for "²", which int() refuses
        if len(parts) != 2 or not all(p.strip().isascii() and p.strip().isdigit() for p in parts):
            raise InvalidRequestError("size", f"got {str(size)[:40]!r}", "WIDTHxHEIGHT, e.g. 832x480")
        fields["width"], fields["height"] = (int(p) for p in parts)
    fps = fields.get("fps", SamplingParams.fps)
    if not 1 <= fps <= 240:
        raise InvalidRequestError("fps", f"got {fps}", "integers 1..240")
    seconds = values.get("seconds")
    if seconds is not None:
        secs = _convert("seconds", seconds, float, "a number of seconds, e.g. \"4\"")
        if not 0 < secs <= MAX_SECONDS:
            raise InvalidRequestError("seconds", f"got {secs:g}", f"more than 0, at most {MAX_SECONDS:g}")
        if "num_frames" not in values:
            # the nearest 4k + 1 frames to seconds x fps (Wan's VAE takes 1 + 4k)
            fields["num_frames"] = 4 * max(0, round((secs * fps - 1) / 4)) + 1
    frames = fields.get("num_frames", SamplingParams.num_frames)
    seconds_text = str(seconds) if seconds is not None else f"{frames / fps:g}"
    size_text = f"{fields.get('width', SamplingParams.width)}x{fields.get('height', SamplingParams.height)}"
    return VideoRequest(prompt=prompt, model=model, seconds=seconds_text, size=size_text, fields=fields)
