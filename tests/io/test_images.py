"""Conditioning images: bounded, validated reading, and the model input equal to diffusers'."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vidloom import InvalidRequestError
from vidloom.io.images import MAX_SIDE, load_image, to_model_input


def _picture(w=40, h=30):
    g = np.random.default_rng(0)
    return Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def test_path_array_and_pil_give_the_same_rgb_image(tmp_path):
    picture = _picture()
    picture.save(tmp_path / "a.png")
    from_file = load_image(tmp_path / "a.png")
    from_array = load_image(np.asarray(picture))
    from_float = load_image(np.asarray(picture) / 255.0)
    assert from_file.mode == "RGB" and from_file.size == (40, 30)
    assert np.array_equal(np.asarray(from_file), np.asarray(picture))
    assert np.array_equal(np.asarray(from_array), np.asarray(picture))
    assert np.array_equal(np.asarray(from_float), np.asarray(picture))
    assert load_image(picture.convert("RGBA")).mode == "RGB"


@pytest.mark.parametrize("make,needle", [
    (lambda p: p.write_text("not an image"), "not an image this engine reads"),
    (lambda p: p.write_bytes(b""), "not an image this engine reads"),
    (lambda p: p.write_bytes(_png_bytes(_picture())[:60]), "cannot be decoded"),
    (lambda p: _picture(MAX_SIDE + 1, 1).save(p, format="PNG"), f"image of {MAX_SIDE + 1}x1 pixels"),
])
def test_bad_image_files_are_one_line_errors(tmp_path, make, needle):
    path = tmp_path / "x.png"
    make(path)
    with pytest.raises(InvalidRequestError, match=needle) as err:
        load_image(path, "last_image")
    assert err.value.field == "last_image" and "\n" not in str(err.value)


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    # 100,000 x 100,000 pixels of one colour compress to a few MB; decoding would take 30 GB
    path = tmp_path / "bomb.png"
    with open(path, "wb") as fh:
        fh.write(_png_header(100_000, 100_000))
    with pytest.raises(InvalidRequestError, match="claims more pixels than an image may have") as err:
        load_image(path)
    assert "10000000000 pixels" in str(err.value)
    # below PIL's own bomb limit, our bound still holds: 20000 x 1 passes PIL, not MAX_SIDE
    with open(path, "wb") as fh:
        fh.write(_png_header(20_000, 1))
    with pytest.raises(InvalidRequestError, match=r"^image: image of 20000x1 pixels"):
        load_image(path)


@pytest.mark.parametrize("value,needle", [
    (np.zeros((0, 4, 3), np.uint8), "image of 4x0 pixels"),
    (np.zeros((4, 4), np.uint8), "array of shape"),
    (np.zeros((4, 4, 3), np.int32), "dtype int32"),
    (np.full((4, 4, 3), 2.0), "outside \\[0, 1\\]"),
    (np.full((4, 4, 3), np.nan), "outside \\[0, 1\\]"),
    (5, "unsupported type int"),
    ("/no/such/file.png", "no image file"),
])
def test_bad_values(value, needle):
    with pytest.raises(InvalidRequestError, match=needle):
        load_image(value)


def test_model_input_equals_diffusers_video_processor():
    from diffusers.video_processor import VideoProcessor

    picture = _picture(50, 37)
    ours = to_model_input(picture, 32, 48)
    ref = VideoProcessor(vae_scale_factor=8).preprocess(picture, height=32, width=48)
    assert ours.shape == ref.shape == (1, 3, 32, 48) and ours.dtype == torch.float32
    assert torch.equal(ours, ref)


def _png_bytes(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG claiming width x height, with a few bytes of pixel data: the size is in the header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))
