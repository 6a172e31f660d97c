"""Conditioning images (image-to-video): read from untrusted input, bounded, and turned into the
tensors a video model takes.

``load_image`` accepts a PIL image, a path to an image file, or an ``(H, W, 3)`` array (uint8, or
float in [0, 1]) and returns an RGB PIL image, or an ``InvalidRequestError`` naming the field:
files are bounded in bytes and pixels before they are decoded (a small PNG can claim a
gigapixel: a decompression bomb), sides must be 1..MAX_SIDE pixels, and anything that is not an
image PIL reads is an error, never a traceback.

``to_model_input`` resizes to the video's size exactly as diffusers' ``VideoProcessor.preprocess``
does for PIL input (a Lanczos resize to (width, height), no aspect-preserving crop), then maps
[0, 255] to [-1, 1]: ``(1, 3, height, width)`` float32.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from vidloom.errors import InvalidRequestError

MAX_SIDE = 16384  # pixels per side; far above any video size a model takes
MAX_PIXELS = 2**26  # 67 Mpx: a 8192 x 8192 image; PIL's own bomb limit is ~89 Mpx
MAX_FILE_BYTES = 256 * 2**20
ALLOWED = "a PIL image, a path to a PNG/JPEG/WebP/... file, or an (H, W, 3) uint8 or [0, 1] float array"


def check_kind(value: Any, field: str = "image") -> None:
    """InvalidRequestError unless ``value`` is of a kind ``load_image`` takes (a PIL image, a path
    or an array); opens no file, decodes nothing."""
    from PIL import Image

    if not isinstance(value, (Image.Image, str, os.PathLike, np.ndarray)):
        raise InvalidRequestError(field, f"unsupported type {type(value).__name__}", ALLOWED)


def load_image(value: Any, field: str = "image"):
    """``value`` as an RGB PIL image, checked (see the module doc)."""
    from PIL import Image

    check_kind(value, field)
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, np.ndarray):
        image = _from_array(value, field)
    else:
        image = _read_file(Path(value), field)
    _check_size(image.size, field)
    return image if image.mode == "RGB" else image.convert("RGB")


def _read_file(path: Path, field: str):
    from PIL import Image, UnidentifiedImageError

    # messages name the file by its name only: a server's folders are not the client's business
    if not path.is_file():
        raise InvalidRequestError(field, f"no image file named {path.name!r}", ALLOWED)
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise InvalidRequestError(field, f"the file is {size} bytes", f"image files up to {MAX_FILE_BYTES} bytes")
    try:
        with Image.open(path) as image:  # reads the header only: the size is known before decoding
            size_error = _size_error(image.size, field)
            if size_error is None:
                image.load()
                return image.copy()
    except Image.DecompressionBombError as exc:  # PIL's own check on the header's size
        raise InvalidRequestError(field, f"the file claims more pixels than an image may have "
                                  f"({_without(path, exc)})",
                                  f"1..{MAX_SIDE} pixels a side, at most {MAX_PIXELS} pixels") from exc
    except UnidentifiedImageError as exc:
        raise InvalidRequestError(field, f"the file is not an image this engine reads ({_without(path, exc)})",
                                  ALLOWED) from exc
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt data, whatever the format's decoder raises
        raise InvalidRequestError(field, f"the file cannot be decoded ({type(exc).__name__}: "
                                  f"{_without(path, exc)})", ALLOWED) from exc
    raise size_error


def _without(path: Path, exc: BaseException) -> str:
    """The decoder's message with the file's folders left out (PIL quotes the whole path)."""
    return str(exc).replace(str(path), path.name)[:200]


def _from_array(array: np.ndarray, field: str):
    from PIL import Image

    if array.ndim != 3 or array.shape[-1] != 3:
        raise InvalidRequestError(field, f"array of shape {array.shape}", "an (H, W, 3) RGB array")
    _check_size((array.shape[1], array.shape[0]), field)
    if array.dtype == np.uint8:
        return Image.fromarray(array, "RGB")
    if array.dtype.kind != "f":
        raise InvalidRequestError(field, f"array of dtype {array.dtype}", "uint8, or float in [0, 1]")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise InvalidRequestError(field, "float array with values outside [0, 1] (or NaN)", "float in [0, 1]")
    return Image.fromarray(np.rint(array * 255).astype(np.uint8), "RGB")


def _size_error(size: tuple[int, int], field: str) -> InvalidRequestError | None:
    width, height = size
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE) or width * height > MAX_PIXELS:
        return InvalidRequestError(field, f"image of {width}x{height} pixels",
                                   f"1..{MAX_SIDE} pixels a side, at most {MAX_PIXELS} pixels")
    return None


def _check_size(size: tuple[int, int], field: str) -> None:
    error = _size_error(size, field)
    if error is not None:
        raise error


def to_model_input(image, height: int, width: int):
    """RGB PIL image -> (1, 3, height, width) float32 torch tensor in [-1, 1] (see the module doc)."""
    import torch
    from PIL import Image

    resized = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    pixels = np.asarray(resized, dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(pixels).permute(2, 0, 1)[None] * 2.0 - 1.0
