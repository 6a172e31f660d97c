"""Export of generated frames, checked with independent readers: PyAV (a real H.264
decoder, test dependency only) for MP4, Pillow for GIF / PNG, numpy for .npy."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import resource
import signal
import threading
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vidloom.errors import InvalidRequestError, VidloomError
from vidloom.io import (
    OutputWriteError,
    VideoDecodingError,
    VideoEncodingError,
    check_output_path,
    export_video,
    read_video,
    reserve_output_path,
    save_video,
)
from vidloom.io import video as video_module

av = pytest.importorskip("av")

# Mean abs error (uint8 units) allowed after an H.264 CRF 18 + 4:2:0 round trip of
# smooth content; measured ~2 on the clips below.
MP4_MAE_BOUND = 6.0


def gradient_clip(num_frames: int, height: int, width: int) -> np.ndarray:
    """Smooth float32 (T, H, W, 3) clip in [0, 1]: ramps that drift slowly over time."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for t in range(num_frames):
        red = 0.1 + 0.8 * (x + t) / (width + num_frames)
        green = 0.2 + 0.6 * y / max(height - 1, 1)
        blue = np.full_like(x, 0.25 + 0.5 * t / max(num_frames - 1, 1))
        frames.append(np.stack([red, green, blue], axis=-1))
    return np.stack(frames).astype(np.float32)


def as_uint8(frames: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(frames, 0, 1) * 255).astype(np.uint8)


def decode_with_pyav(path):
    """(frames uint8 (T,H,W,3), stream facts) decoded by PyAV."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        facts = {
            "codec": stream.codec_context.name,
            "pix_fmt": stream.codec_context.pix_fmt,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "average_rate": stream.average_rate,
        }
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    return frames, facts


def mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


def hidden_files(folder) -> list[str]:
    """Names a failed or finished export must not leave behind (its temp files)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------- MP4


def test_mp4_decodes_as_h264_yuv420p_with_exact_size_fps_and_content(tmp_path):
    frames = gradient_clip(12, 48, 64)
    out = export_video(frames, tmp_path / "clip.mp4", fps=16)
    assert out == tmp_path / "clip.mp4"

    decoded, facts = decode_with_pyav(out)
    assert facts == {"codec": "h264", "pix_fmt": "yuv420p", "width": 64, "height": 48, "average_rate": 16}
    assert decoded.shape == (12, 48, 64, 3)
    assert mae(decoded, as_uint8(frames)) <= MP4_MAE_BOUND


def test_mp4_solid_colour_round_trips_closely(tmp_path):
    # A saturated colour is where a BT.601/BT.709 matrix mismatch would show (several units).
    frames = np.empty((5, 32, 32, 3), np.float32)
    frames[...] = (0.9, 0.2, 0.4)
    decoded, _ = decode_with_pyav(export_video(frames, tmp_path / "solid.mp4"))
    assert mae(decoded, as_uint8(frames)) <= 2.0


@pytest.mark.parametrize(
    ("fps", "rate"),
    [(24, Fraction(24)), (12.5, Fraction(25, 2)), (Fraction(30000, 1001), Fraction(30000, 1001))],
)
def test_mp4_keeps_requested_fps_exactly(tmp_path, fps, rate):
    path = export_video(gradient_clip(6, 16, 16), tmp_path / "rate.mp4", fps=fps)
    _, facts = decode_with_pyav(path)
    assert facts["average_rate"] == rate


def test_mp4_odd_size_is_padded_to_even_by_edge_replication(tmp_path, caplog):
    frames = gradient_clip(4, 17, 33)  # H=17, W=33
    with caplog.at_level(logging.WARNING, logger="vidloom.io.video"):
        path = export_video(frames, tmp_path / "odd.mp4")
    assert "padding 33x17 frames to 34x18" in caplog.text

    decoded, facts = decode_with_pyav(path)
    assert (facts["width"], facts["height"]) == (34, 18)
    expected = np.pad(as_uint8(frames), ((0, 0), (0, 1), (0, 1), (0, 0)), mode="edge")
    assert mae(decoded, expected) <= MP4_MAE_BOUND


def test_mp4_size_not_multiple_of_16_is_kept(tmp_path):
    # imageio-ffmpeg's default macro_block_size=16 would rescale 40x24 to 48x32.
    path = export_video(gradient_clip(4, 24, 40), tmp_path / "small.mp4")
    decoded, facts = decode_with_pyav(path)
    assert (facts["width"], facts["height"]) == (40, 24)
    assert decoded.shape == (4, 24, 40, 3)


@pytest.mark.parametrize(("height", "width", "encoded"), [(8, 8, (8, 8)), (2, 2, (2, 2)), (1, 1, (2, 2))])
def test_mp4_tiny_sizes_encode(tmp_path, height, width, encoded):
    frames = np.full((3, height, width, 3), 0.5, np.float32)
    decoded, facts = decode_with_pyav(export_video(frames, tmp_path / "tiny.mp4"))
    assert (facts["height"], facts["width"]) == encoded
    assert decoded.shape == (3, *encoded, 3)
    assert mae(decoded, np.full_like(decoded, 128)) <= 2.0


def test_read_video_returns_frames_and_fps(tmp_path):
    frames = gradient_clip(7, 32, 48)
    path = export_video(frames, tmp_path / "clip.mp4", fps=8)
    decoded, fps = read_video(path)
    assert decoded.dtype == np.uint8 and decoded.shape == (7, 32, 48, 3)
    assert fps == 8.0
    assert mae(decoded, as_uint8(frames)) <= MP4_MAE_BOUND


def test_read_video_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "absent.mp4")


def test_mp4_encoder_failure_raises_and_leaves_no_file(tmp_path, monkeypatch):
    real = video_module._x264_command

    def broken_command(*args):
        command = real(*args)
        command[command.index("-c:v") + 1] = "no_such_codec"
        return command

    monkeypatch.setattr(video_module, "_x264_command", broken_command)
    with pytest.raises(VideoEncodingError, match="no_such_codec"):
        export_video(gradient_clip(3, 16, 16), tmp_path / "fail.mp4")
    assert list(tmp_path.iterdir()) == []


def test_truncated_mp4_is_an_error_not_fewer_frames(tmp_path):
    # +faststart puts the index first, so a file cut in half still opens and promises
    # 9 frames; ffmpeg decodes the frames that are there and exits 0. Noise keeps the
    # frames large, so the cut falls after the first few.
    frames = np.random.default_rng(3).random((9, 32, 48, 3), dtype=np.float32)
    path = export_video(frames, tmp_path / "clip.mp4", fps=16)
    assert read_video(path)[0].shape[0] == 9
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoDecodingError, match=r"cut.mp4 is truncated or corrupt: decoded [1-8] of 9") as info:
        read_video(cut)
    assert isinstance(info.value, ValueError) and isinstance(info.value, VidloomError)


def test_mp4_cut_before_its_first_frame_is_a_decoding_error(tmp_path):
    path = export_video(gradient_clip(9, 32, 48), tmp_path / "clip.mp4", fps=16)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a smooth clip is small: little past the index
    with pytest.raises(VideoDecodingError, match="cannot decode .*clip.mp4"):
        read_video(path)


@pytest.mark.parametrize("content", [b"not a video\n", b""], ids=["text", "empty"])
def test_non_video_file_is_a_one_line_decoding_error(tmp_path, content):
    path = tmp_path / "notes.mp4"
    path.write_bytes(content)
    with pytest.raises(VideoDecodingError, match="cannot decode .*notes.mp4: ") as info:
        read_video(path)
    assert "\n" not in str(info.value) and "configuration:" not in str(info.value)


def test_path_that_looks_like_a_url_is_a_file(tmp_path, monkeypatch):
    # Bare, 'pipe:/x.mp4' is ffmpeg's pipe protocol; here it is a folder 'pipe:' in the cwd.
    monkeypatch.chdir(tmp_path)
    frames = gradient_clip(4, 16, 16)
    assert export_video(frames, "pipe:/x.mp4") == Path("pipe:/x.mp4")
    decoded, _ = decode_with_pyav(tmp_path / "pipe:" / "x.mp4")
    assert decoded.shape == (4, 16, 16, 3)
    assert read_video("pipe:/x.mp4")[0].shape == (4, 16, 16, 3)


def test_creates_parent_folders_and_accepts_upper_case_suffix(tmp_path):
    path = export_video(gradient_clip(2, 16, 16), tmp_path / "a" / "b" / "clip.MP4")
    assert path.is_file()
    assert decode_with_pyav(path)[1]["codec"] == "h264"


# ---------------------------------------------------------------- GIF


def read_gif(path):
    with Image.open(path) as gif:
        durations, frames = [], []
        for index in range(gif.n_frames):
            gif.seek(index)
            durations.append(gif.info["duration"])
            frames.append(np.asarray(gif.convert("RGB")))
        return np.stack(frames), durations, gif.info.get("loop")


def test_gif_frame_count_duration_and_loop(tmp_path):
    frames = gradient_clip(6, 24, 32)
    decoded, durations, loop = read_gif(export_video(frames, tmp_path / "clip.gif", fps=10))
    assert decoded.shape == (6, 24, 32, 3)
    assert durations == [100] * 6
    assert loop == 0  # forever
    assert mae(decoded, as_uint8(frames)) <= 10.0  # one shared 256-colour palette, measured ~7


def test_gif_durations_keep_the_timeline_at_16_fps(tmp_path):
    # 62.5 ms per frame is not a whole number of centiseconds: delays alternate 60/70 ms
    # and every frame start stays within 5 ms of t / fps.
    frames = gradient_clip(16, 16, 16)
    _, durations, _ = read_gif(export_video(frames, tmp_path / "clip.gif", fps=16))
    assert len(durations) == 16 and set(durations) <= {60, 70}
    starts = np.cumsum([0, *durations])
    assert np.abs(starts - np.arange(17) * 1000 / 16).max() <= 5


# ---------------------------------------------------------------- PNG folder and npy


def test_png_folder_has_exact_pixels(tmp_path):
    rng = np.random.default_rng(0)
    levels = rng.integers(0, 256, size=(3, 9, 11, 3))
    frames = (levels / 255).astype(np.float32)
    folder = export_video(frames, tmp_path / "frames")
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["frame_00000.png", "frame_00001.png", "frame_00002.png"]
    for index, name in enumerate(names):
        with Image.open(folder / name) as image:
            assert image.size == (11, 9) and image.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(image), levels[index])


def test_png_into_existing_folder_with_a_dot(tmp_path):
    folder = tmp_path / "run.v2"
    folder.mkdir()
    export_video(np.zeros((2, 4, 4, 3), np.uint8), folder)
    assert sorted(p.name for p in folder.iterdir()) == ["frame_00000.png", "frame_00001.png"]


def test_float_to_uint8_clips_then_rounds(tmp_path):
    values = np.array([-0.3, 0.0, 0.499 / 255, 0.501 / 255, 0.5, 254.6 / 255, 1.0, 1.7], np.float32)
    frames = np.broadcast_to(values[None, None, :, None], (1, 1, 8, 3)).copy()
    folder = export_video(frames, tmp_path / "levels")
    with Image.open(folder / "frame_00000.png") as image:
        pixels = np.asarray(image)[0, :, 0]
    assert pixels.tolist() == [0, 0, 0, 1, 128, 255, 255, 255]


def test_uint8_and_torch_inputs(tmp_path):
    levels = np.arange(2 * 3 * 5 * 3, dtype=np.uint8).reshape(2, 3, 5, 3)
    export_video(levels, tmp_path / "u8")
    export_video(torch.from_numpy(levels.astype(np.float32) / 255), tmp_path / "torch")
    for folder in ("u8", "torch"):
        with Image.open(tmp_path / folder / "frame_00001.png") as image:
            np.testing.assert_array_equal(np.asarray(image), levels[1])


def test_npy_is_bit_exact(tmp_path):
    frames = np.random.default_rng(1).random((3, 5, 7, 3), dtype=np.float32)
    path = export_video(frames, tmp_path / "frames.npy")
    loaded = np.load(path)
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded.view(np.uint32), frames.view(np.uint32))


@pytest.mark.parametrize("suffix", [".NPY", ".Npy"])
def test_npy_with_upper_case_suffix_is_written_and_leaves_no_temp_file(tmp_path, suffix):
    frames = np.random.default_rng(2).random((2, 4, 4, 3), dtype=np.float32)
    path = export_video(frames, tmp_path / f"frames{suffix}")
    np.testing.assert_array_equal(np.load(path), frames)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"frames{suffix}"]


def test_png_frame_symlink_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "frame_00000.png").symlink_to(victim)
    levels = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(1, 4, 4, 3)
    export_video(levels, folder)
    assert victim.read_text() == "keep me"
    frame = folder / "frame_00000.png"
    assert frame.is_file() and not frame.is_symlink()
    with Image.open(frame) as image:
        np.testing.assert_array_equal(np.asarray(image), levels[0])
    assert hidden_files(folder) == []


def test_npy_from_bf16_tensor_is_float32(tmp_path):
    tensor = torch.rand(2, 4, 4, 3).to(torch.bfloat16)
    loaded = np.load(export_video(tensor, tmp_path / "frames.npy"))
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, tensor.float().numpy())


# ---------------------------------------------------------------- reserved default outputs


def test_reserve_output_path_gives_distinct_new_files_from_two_threads(tmp_path):
    folder = tmp_path / "outputs" / "day"  # created
    found: list[list] = [[], []]

    def reserve(into):
        into.extend(reserve_output_path(folder, "task") for _ in range(100))

    threads = [threading.Thread(target=reserve, args=(into,)) for into in found]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    paths = found[0] + found[1]
    assert len(set(paths)) == 200
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in paths)
    assert all(p.stat().st_size == 0 for p in paths)
    assert all(re.fullmatch(r"task-\d{8}-\d{6}-[0-9a-f]{8}\.mp4", p.name) for p in paths)


def test_export_onto_a_reserved_file(tmp_path):
    path = reserve_output_path(tmp_path, "task", ".mp4")
    assert export_video(gradient_clip(3, 16, 16), path) == path
    assert decode_with_pyav(path)[0].shape == (3, 16, 16, 3)
    assert hidden_files(tmp_path) == []


def test_save_video_writes_the_given_path_or_a_new_file_of_its_own(tmp_path):
    given = tmp_path / "given.mp4"
    assert save_video(gradient_clip(3, 16, 16), given, fps=8) == given
    made = save_video(gradient_clip(3, 16, 16), None, fps=8, folder=tmp_path / "out", stem="task-1")
    assert made.parent == tmp_path / "out" and made.name.startswith("task-1-") and made.suffix == ".mp4"
    for path in (given, made):
        assert decode_with_pyav(path)[0].shape == (3, 16, 16, 3)
    assert hidden_files(tmp_path) == [] and hidden_files(tmp_path / "out") == []


def test_save_video_removes_its_own_file_when_the_export_fails(tmp_path):
    bad = np.full((2, 16, 16, 3), np.nan, np.float32)  # non-finite frames are an error
    with pytest.raises(InvalidRequestError):
        save_video(bad, None, folder=tmp_path, stem="task")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("stem", "suffix", "field"),
    [("", ".mp4", "stem"), ("a/b", ".mp4", "stem"), ("task", "", "suffix"), ("task", ".avi", "suffix")],
)
def test_reserve_output_path_rejects_names_it_cannot_reserve(tmp_path, stem, suffix, field):
    with pytest.raises(InvalidRequestError) as info:
        reserve_output_path(tmp_path, stem, suffix)
    assert info.value.field == field
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- output path checks


def test_check_output_path_returns_the_kind_and_creates_nothing(tmp_path):
    assert check_output_path(tmp_path / "a" / "b" / "clip.GIF") == "gif"
    assert check_output_path(tmp_path / "a" / "frames") == "png"
    assert list(tmp_path.iterdir()) == []


def not_a_folder_cases(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    return {
        "device": "/dev/full/x.npy",
        "file-parent": tmp_path / "file.txt" / "x.npy",
        "file-grandparent-png": tmp_path / "file.txt" / "sub" / "frames",
        "dangling-link": tmp_path / "dangling" / "x.mp4",
    }


@pytest.mark.parametrize("case", ["device", "file-parent", "file-grandparent-png", "dangling-link"])
def test_check_output_path_rejects_a_file_where_a_folder_must_be(tmp_path, case):
    with pytest.raises(InvalidRequestError, match="is not a folder") as info:
        check_output_path(not_a_folder_cases(tmp_path)[case])
    assert info.value.field == "output_path"


@pytest.mark.parametrize("path", ["/proc/x.npy", "/sys/x.npy", "/proc/frames", "/proc/self/x.mp4", "link/x.gif"])
def test_check_output_path_rejects_pseudo_file_systems(tmp_path, monkeypatch, path):
    # As root os.access calls /proc writable, yet creating a file there fails.
    (tmp_path / "link").symlink_to("/proc")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidRequestError, match="pseudo file system") as info:
        check_output_path(path)
    assert info.value.field == "output_path" and "/proc" in info.value.allowed


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_check_output_path_rejects_an_unwritable_folder(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o500)
    try:
        with pytest.raises(InvalidRequestError, match="not writable") as info:
            check_output_path(folder / "new" / "clip.mp4")
        assert info.value.field == "output_path"
    finally:
        folder.chmod(0o700)


def test_export_checks_the_output_path_before_the_frames():
    with pytest.raises(InvalidRequestError) as info:
        export_video("not frames", "/dev/full/x.npy")
    assert info.value.field == "output_path"


# ---------------------------------------------------------------- write failures


@contextlib.contextmanager
def file_size_limit(limit: int = 8192):
    """Fail writes past ``limit`` bytes in this process (and ffmpeg, which inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG), pytest lives
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def noise_frames() -> np.ndarray:
    """4 frames of 64x64 noise: 48 KiB that no format compresses under 8 KiB (a PNG
    frame is 12 KiB, the whole MP4 13 KiB)."""
    return np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)


def files_under(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("name", ["clip.npy", "clip.gif", "frames"])
def test_write_failure_after_the_work_is_an_output_write_error(tmp_path, name):
    frames, path = noise_frames(), tmp_path / name
    with pytest.raises(OutputWriteError) as info, file_size_limit():
        export_video(frames, path)
    assert isinstance(info.value, OSError) and info.value.errno == errno.EFBIG
    assert str(info.value) == f"cannot write {path}: File too large"
    # no partial file; the PNG folder stays, without the frame that failed
    assert files_under(tmp_path) == (["frames"] if name == "frames" else [])


def test_mp4_write_failure_is_an_encoding_error_and_leaves_no_file(tmp_path):
    # ffmpeg writes the MP4 itself, and subprocess restores SIGXFSZ for it: it is killed.
    frames = noise_frames()
    with pytest.raises(VideoEncodingError, match="File size limit exceeded"), file_size_limit():
        export_video(frames, tmp_path / "clip.mp4")
    assert files_under(tmp_path) == []


def test_mp4_on_a_full_filesystem_is_an_output_write_error_with_enospc(tmp_path):
    """ffmpeg reports the full disk only as its exit status (228: -ENOSPC); export_video turns
    it into the OSError a caller can tell apart (wait for room) from a failed encode."""
    from ..filesystems import fill, tmpfs

    with tmpfs(tmp_path / "small", 1) as root:
        fill(root)
        with pytest.raises(OutputWriteError) as info:
            export_video(noise_frames(), root / "clip.mp4")
        assert info.value.errno == errno.ENOSPC
        assert sorted(p.name for p in root.iterdir()) == ["filler"]  # no partial file


def test_output_write_error_is_a_vidloom_and_os_error(tmp_path, monkeypatch):
    def disk_full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(video_module, "_write_gif", disk_full)
    with pytest.raises(OutputWriteError) as info:
        export_video(gradient_clip(2, 8, 8), tmp_path / "clip.gif")
    assert isinstance(info.value, VidloomError) and isinstance(info.value, OSError)
    assert info.value.errno == errno.ENOSPC
    assert str(info.value) == f"cannot write {tmp_path / 'clip.gif'}: No space left on device"
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- errors


def test_unknown_extension_names_output_path(tmp_path):
    with pytest.raises(InvalidRequestError) as info:
        export_video(gradient_clip(2, 8, 8), tmp_path / "clip.avi")
    assert info.value.field == "output_path"
    assert ".mp4" in info.value.allowed and ".gif" in info.value.allowed
    assert not (tmp_path / "clip.avi").exists()


def test_existing_file_without_suffix_is_not_a_folder(tmp_path):
    (tmp_path / "frames").write_text("x")
    with pytest.raises(InvalidRequestError) as info:
        export_video(gradient_clip(2, 8, 8), tmp_path / "frames")
    assert info.value.field == "output_path"


@pytest.mark.parametrize(
    "frames",
    [
        np.zeros((2, 8, 8), np.float32),  # no channel axis
        np.zeros((2, 8, 8, 4), np.float32),  # RGBA
        np.zeros((8, 8, 3), np.float32),  # a single image
        np.zeros((0, 8, 8, 3), np.float32),  # no frames
        np.zeros((2, 8, 8, 3), np.int64),  # unsupported dtype
        [[[[0.0, 0.0, 0.0]]]],  # not an array
    ],
    ids=["THW", "4-channels", "HWC", "empty", "int64", "list"],
)
def test_bad_frames_name_the_field(tmp_path, frames):
    with pytest.raises(InvalidRequestError) as info:
        export_video(frames, tmp_path / "clip.mp4")
    assert info.value.field == "frames"
    assert not (tmp_path / "clip.mp4").exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_frames_name_the_field_and_frame(tmp_path, bad):
    frames = gradient_clip(3, 8, 8)
    frames[2, 1, 1, 0] = bad
    with pytest.raises(InvalidRequestError, match="frame 2") as info:
        export_video(frames, tmp_path / "clip.mp4")
    assert info.value.field == "frames"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"fps": 0}, "fps"), ({"fps": -8}, "fps"), ({"fps": float("nan")}, "fps"), ({"crf": 60}, "crf"),
     ({"preset": "turbo"}, "preset")],
)
def test_bad_settings_name_the_field(tmp_path, kwargs, field):
    with pytest.raises(InvalidRequestError) as info:
        export_video(gradient_clip(2, 8, 8), tmp_path / "clip.mp4", **kwargs)
    assert info.value.field == field


@pytest.mark.parametrize("fps", [1e-9, Fraction(1, 1002), 1000.5, 1e12])
@pytest.mark.parametrize("name", ["clip.gif", "clip.mp4"])
def test_fps_without_a_usable_rational_names_the_field(tmp_path, fps, name):
    # 1e-9 once became Fraction(0) after limit_denominator(1001): ZeroDivisionError in GIF.
    with pytest.raises(InvalidRequestError) as info:
        export_video(gradient_clip(2, 8, 8), tmp_path / name, fps=fps)
    assert info.value.field == "fps" and "1000" in info.value.allowed
    assert list(tmp_path.iterdir()) == []


def test_fps_range_ends_are_accepted(tmp_path):
    _, facts = decode_with_pyav(export_video(gradient_clip(2, 8, 8), tmp_path / "fast.mp4", fps=1000))
    assert facts["average_rate"] == 1000
    assert export_video(gradient_clip(2, 8, 8), tmp_path / "slow.npy", fps=Fraction(1, 1001)).is_file()
