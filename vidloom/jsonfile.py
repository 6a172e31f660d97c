"""The JSON files of a model folder: reading them bounded in size and depth (a JSON object or an
error), and writing them as the folders vidloom makes hold them.

Every JSON file the loader reads (``model_index.json``, ``config.json``, shard indexes, scheduler
configs) comes through ``read_json_object``, so a malformed file is a ``ModelLoadError`` naming
it, never a traceback from deep inside the code that used its values.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import ModelLoadError

# Far above any real config (a 14B model's shard index is ~100 KB); bounds a hostile file's cost.
MAX_JSON_BYTES = 16 * 2**20


def read_json_object(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; ``what`` names the file in errors ("model_index.json", ...)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{what} is missing", file=str(path))
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise ModelLoadError(f"{what} is {size} bytes (at most {MAX_JSON_BYTES})", file=str(path))
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise ModelLoadError(f"cannot read {what} ({exc.strerror or exc})", file=str(path)) from exc
    except RecursionError as exc:  # deeply nested arrays or objects
        raise ModelLoadError(f"{what} is nested too deeply to be a config", file=str(path)) from exc
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ModelLoadError(f"{what} is not valid JSON ({exc})", file=str(path)) from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{what} must hold a JSON object, got {type(data).__name__}", file=str(path))
    return data


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """``data`` as indented JSON in ``path`` (diffusers' layout of config files), its folder made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages about untrusted values."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
