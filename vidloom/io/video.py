"""Export generated frames (MP4 / GIF / PNG folder / .npy) and read MP4 files back.

Frames arrive as ``(T, H, W, 3)`` RGB: float in [0, 1] (numpy or torch, the decoder's
output) or uint8. The format follows the output path:

=================  ==========================================================
``*.mp4``          H.264 (libx264), yuv420p, BT.709 tagged, the exact fps
``*.gif``          looping GIF, frame durations that add up to T / fps
``*.npy``          the frames array itself, dtype and values unchanged
no suffix / dir    a folder of ``frame_00000.png, frame_00001.png, ...``
=================  ==========================================================

MP4 goes through the ffmpeg binary that imageio-ffmpeg bundles, driven directly
rather than through ``imageio_ffmpeg.write_frames``: that helper rescales any size that
is not a multiple of 16 by default and never reports ffmpeg's exit status, so a failed
encode would go unnoticed. Every path reaches ffmpeg as an absolute ``file:`` URL.

``check_output_path`` tells before any generation whether a path can be written;
``reserve_output_path`` creates a unique default output file; ``save_video`` is the one
export step of the Python API, the CLI and the server.
"""

from __future__ import annotations

import contextlib
import logging
import math
import errno
import os
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from fractions import Fraction
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np

from vidloom.errors import InvalidRequestError, VidloomError

logger = logging.getLogger(__name__)

FILE_FORMATS = {".mp4": "mp4", ".gif": "gif", ".npy": "npy"}
ALLOWED_OUTPUTS = "'.mp4', '.gif', '.npy', or a path without extension (folder of PNG frames)"
X264_PRESETS = (
    "ultrafast", "superfast", "veryfast", "faster", "fast",
    "medium", "slow", "slower", "veryslow", "placebo",
)
# GIF delays are whole centiseconds, and browsers play delays under 2 cs as 10 cs.
GIF_MIN_DELAY_CS = 2
# ffmpeg wants a rational frame rate; 1001 keeps NTSC rates (30000/1001) exact.
MAX_FPS_DENOMINATOR = 1001
# The slowest rate such a fraction holds: anything slower would round to 0 fps.
MIN_FPS = Fraction(1, MAX_FPS_DENOMINATOR)
# Far beyond any display; a larger value is a mistake (a frame count, or ms per frame).
MAX_FPS = 1000
# Pseudo file systems: os.access may call them writable (always, for root), yet creating
# a file there fails.
PSEUDO_FILESYSTEMS = (Path("/proc"), Path("/sys"))


# the write errors ffmpeg can exit with that mean "no room": a full disk, a quota, a file size limit
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class VideoEncodingError(VidloomError, RuntimeError):
    """The encoder (ffmpeg) failed; the message carries the tail of its log."""


class OutputWriteError(VidloomError, OSError):
    """Writing the output failed after the work was done (disk full, file size limit,
    I/O error). ``errno`` is the cause's; a single-file output leaves no partial file."""


class VideoDecodingError(VidloomError, ValueError):
    """A file is not a video ffmpeg can decode, or it is truncated or corrupt."""


# ---------------------------------------------------------------- public API


def export_video(
    frames: Any,
    path: str | os.PathLike[str],
    fps: float | Fraction = 16,
    *,
    crf: int = 18,
    preset: str = "fast",
) -> Path:
    """Write ``frames`` to ``path`` in the format its extension names; return the path.

    ``frames``: ``(T, H, W, 3)`` float in [0, 1] (clipped, then rounded to uint8 for
    image formats) or uint8, as a numpy array or torch tensor. Non-finite values are
    an error. ``crf`` and ``preset`` are libx264 settings, used only for MP4 (CRF 18 is
    visually near-lossless; lower is better, 0..51).

    ``fps`` lies in 1/1001 .. 1000 and is kept as the nearest fraction with a
    denominator <= 1001.

    ``path`` is checked first, with ``check_output_path``. MP4 frames with an odd
    height or width are padded by one replicated edge row or column to the next even
    size, because yuv420p stores chroma at half resolution; other sizes (any even size,
    multiple of 16 or not) are kept exactly. Parent folders are created. Single-file
    outputs are written to a new hidden temporary file next to the target (suffix in
    lower case) and renamed onto it, so a failed export leaves no partial file, an
    existing file (such as one from ``reserve_output_path``) is replaced whole, and a
    symlink at the target is replaced, never written through. A PNG folder may already
    exist: each frame is written the same way, so same-named frames (or symlinks in
    their place) are replaced and other files are left; frames written before a failure
    stay. ``.npy`` stores the array as given (torch bf16 / fp16 become float32).

    Raises InvalidRequestError naming the field for a bad argument, OutputWriteError
    when writing fails (disk full, file size limit, I/O error) and VideoEncodingError
    when ffmpeg fails (for MP4 that includes ffmpeg's own write errors, except running out of
    room: a full disk, a quota or the file size limit ffmpeg reports as its exit status is an
    OutputWriteError with that errno).
    """
    path = Path(path)
    kind = check_output_path(path)
    fps = _check_fps(fps)
    array = as_frame_array(frames)
    if kind == "mp4":
        _check_x264_settings(crf, preset)

    start = time.perf_counter()
    try:
        _write_output(kind, array, path, fps, crf, preset)
    except OSError as exc:
        # After minutes of generation the caller needs one error type that names the file.
        raise _output_write_error(path, exc) from exc
    t, h, w, _ = array.shape
    logger.info("exported %d frames %dx%d to %s in %.2fs", t, w, h, path, time.perf_counter() - start)
    return path


def save_video(
    frames: Any,
    path: str | os.PathLike[str] | None,
    fps: float | Fraction = 16,
    *,
    folder: str | os.PathLike[str] = "outputs",
    stem: str = "video",
) -> Path:
    """Write a finished video where the caller chose, or to a new file of its own: the one
    export step of the Python API, the CLI and the server. Return the path written.

    With ``path``, ``export_video(frames, path, fps)``: a hidden temporary file next to
    ``path`` renamed onto it, so a failed export leaves no partial file (the caller picks
    the name, e.g. the server's attempt-numbered ones). Without it, an MP4 under a name
    that no other request gets (``reserve_output_path(folder, stem)``), removed again if
    the export fails. Raises as ``export_video`` does.
    """
    if path is not None:
        return export_video(frames, path, fps=fps)
    reserved = reserve_output_path(folder, stem)
    try:
        return export_video(frames, reserved, fps=fps)
    except BaseException:
        reserved.unlink(missing_ok=True)
        raise


def read_video(path: str | os.PathLike[str]) -> tuple[np.ndarray, float]:
    """Decode a video file (MP4 or anything ffmpeg reads) to ``(frames, fps)``.

    ``frames`` is uint8 ``(T, H, W, 3)`` RGB, converted with the colour matrix the file
    is tagged with. ``fps`` is the rate ffmpeg reports, rounded by ffmpeg to two
    decimals for non-integer rates (30000/1001 reads as 29.97); 0.0 if unknown.

    Raises FileNotFoundError for a missing file and VideoDecodingError for a file
    ffmpeg cannot open as a video, or one that decodes to fewer frames than its
    container's duration x fps (truncated or corrupt: ffmpeg itself just stops early and
    exits 0). That count is checked only where the duration and fps are known and there
    is no audio track, whose length may differ from the video's.
    """
    import imageio_ffmpeg

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video file at {path}")
    # read_frames hands the string to ffmpeg's -i unchanged.
    reader = imageio_ffmpeg.read_frames(_ffmpeg_url(path), pix_fmt="rgb24")
    try:
        meta = next(reader)
        width, height = meta["size"]
        frames = [np.frombuffer(buf, np.uint8).reshape(height, width, 3) for buf in reader]
    except (OSError, RuntimeError) as exc:
        raise VideoDecodingError(f"cannot decode {path}: {_ffmpeg_verdict(exc)}") from exc
    finally:
        reader.close()
    _check_frame_count(path, len(frames), meta)
    stacked = np.stack(frames) if frames else np.zeros((0, height, width, 3), np.uint8)
    return stacked, float(meta["fps"])


def reserve_output_path(folder: str | os.PathLike[str], stem: str, suffix: str = ".mp4") -> Path:
    """Create a new, empty file ``folder/{stem}-{YYYYmmdd-HHMMSS}-{8 hex digits}{suffix}``
    and return its path: a default output name that no other request, thread or
    process gets.

    The folder is created. The file is created exclusively (O_CREAT | O_EXCL), so two
    callers never share a name, even within one second; a name that exists is drawn
    again. ``export_video`` replaces the reserved file with the finished output; a
    caller that ends up not exporting removes it. ``suffix`` is '.mp4', '.gif' or
    '.npy' (a PNG folder is no file to reserve); ``stem`` is a plain name, no folders.
    """
    if not stem or Path(stem).name != stem:
        raise InvalidRequestError("stem", f"got {stem!r}", "a non-empty file name without folders")
    if suffix.lower() not in FILE_FORMATS:
        raise InvalidRequestError("suffix", f"got {suffix!r}", ", ".join(repr(s) for s in FILE_FORMATS))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return _create_new_file(
        folder, lambda: f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}{suffix}"
    )


# ---------------------------------------------------------------- validation


def check_output_path(path: str | os.PathLike[str]) -> str:
    """Everything about an output path that can be known before any generation: its
    format (``output_kind``), and that the folder it goes into exists or can be created
    and is one this user can write. Creates nothing. Return the kind; raise
    InvalidRequestError naming output_path otherwise."""
    path = Path(path)
    kind = output_kind(path)
    anchor = _nearest_existing(Path(os.path.abspath(path if kind == "png" else path.parent)))
    if not anchor.is_dir():
        raise InvalidRequestError(
            "output_path", f"{anchor} is not a folder", "a path whose folders exist or can be created"
        )
    real = Path(os.path.realpath(anchor))
    if any(real.is_relative_to(root) for root in PSEUDO_FILESYSTEMS):
        raise InvalidRequestError(
            "output_path", f"{anchor} is on a pseudo file system ({real})", "a path outside /proc and /sys"
        )
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise InvalidRequestError(
            "output_path", f"folder {anchor} is not writable for this user", "a path in a folder this user can write"
        )
    return kind


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists; a dangling symlink counts, as mkdir
    cannot pass it either."""
    while not os.path.lexists(path):
        path = path.parent
    return path


def output_kind(path: Path) -> str:
    """'mp4' | 'gif' | 'npy' | 'png' (a folder of frames), or an error naming output_path."""
    if path.is_dir() or path.suffix == "":
        if path.exists() and not path.is_dir():
            raise InvalidRequestError(
                "output_path", f"{path} is an existing file, not a folder for PNG frames", ALLOWED_OUTPUTS
            )
        return "png"
    kind = FILE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise InvalidRequestError("output_path", f"unsupported extension '{path.suffix}'", ALLOWED_OUTPUTS)
    return kind


def as_frame_array(frames: Any) -> np.ndarray:
    """Validate frames and return them as a numpy array (float or uint8), not copied
    where no conversion is needed."""
    array = _to_numpy(frames)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise InvalidRequestError(
            "frames", f"expected shape (T, H, W, 3), got {tuple(array.shape)}", "RGB frames laid out (T, H, W, 3)"
        )
    if min(array.shape[:3]) < 1:
        raise InvalidRequestError("frames", f"empty frames array of shape {tuple(array.shape)}", "T, H, W >= 1")
    if array.dtype != np.uint8 and array.dtype.kind != "f":
        raise InvalidRequestError("frames", f"unsupported dtype {array.dtype}", "float in [0, 1] or uint8")
    if array.dtype.kind == "f":
        # Frame by frame: a whole-clip isfinite mask would be T*H*W*3 bytes.
        for index, frame in enumerate(array):
            if not np.isfinite(frame).all():
                raise InvalidRequestError(
                    "frames", f"frame {index} holds NaN or infinite values", "finite values in [0, 1]"
                )
    return array


def _to_numpy(frames: Any) -> np.ndarray:
    if isinstance(frames, np.ndarray):
        return frames
    # torch is imported only when a tensor could be here, keeping this module light.
    import torch

    if isinstance(frames, torch.Tensor):
        tensor = frames.detach()
        if tensor.is_floating_point() and tensor.dtype not in (torch.float32, torch.float64):
            tensor = tensor.float()  # bf16 / fp16 have no (or no exact) numpy counterpart
        return tensor.cpu().numpy()
    raise InvalidRequestError("frames", f"unsupported type {type(frames).__name__}", "numpy array or torch tensor")


def _check_fps(fps: Any) -> Fraction:
    if isinstance(fps, bool) or not isinstance(fps, Real) or not math.isfinite(fps) or not MIN_FPS <= fps <= MAX_FPS:
        raise InvalidRequestError("fps", f"got {fps!r}", f"a number from 1/{MAX_FPS_DENOMINATOR} to {MAX_FPS}")
    return Fraction(fps).limit_denominator(MAX_FPS_DENOMINATOR)


def _check_x264_settings(crf: Any, preset: Any) -> None:
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise InvalidRequestError("crf", f"got {crf!r}", "an integer 0..51 (lower is better)")
    if preset not in X264_PRESETS:
        raise InvalidRequestError("preset", f"got {preset!r}", ", ".join(X264_PRESETS))


# ---------------------------------------------------------------- pixel conversion


def to_uint8(frame: np.ndarray) -> np.ndarray:
    """Float [0, 1] -> uint8 by clipping then rounding to nearest; uint8 passes through."""
    if frame.dtype == np.uint8:
        return frame
    return np.rint(np.clip(frame, 0.0, 1.0) * 255.0).astype(np.uint8)


def pad_to_even(frame: np.ndarray) -> np.ndarray:
    """Replicate the last row / column once where H / W is odd (yuv420p needs even sizes)."""
    h, w, _ = frame.shape
    if h % 2 == 0 and w % 2 == 0:
        return frame
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


# ---------------------------------------------------------------- writers


def _output_write_error(path: Path, cause: OSError) -> OutputWriteError:
    error = OutputWriteError(f"cannot write {path}: {cause.strerror or cause}")
    error.errno = cause.errno  # so callers can still tell ENOSPC from EIO
    return error


def _write_output(kind: str, frames: np.ndarray, path: Path, fps: Fraction, crf: int, preset: str) -> None:
    if kind == "png":
        _write_png_folder(frames, path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_output(path) as tmp:
        if kind == "mp4":
            _write_mp4(frames, tmp, fps, crf, preset)
        elif kind == "gif":
            _write_gif(frames, tmp, fps)
        else:
            _write_npy(frames, tmp)


def _create_new_file(folder: Path, draw_name: Callable[[], str]) -> Path:
    """Create an empty file in ``folder`` under a freshly drawn name; return its path.
    O_EXCL makes this atomic and never opens an existing file or follows a planted
    symlink; a name that exists is drawn again."""
    while True:
        path = folder / draw_name()
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return path


@contextlib.contextmanager
def _atomic_output(path: Path) -> Iterator[Path]:
    """Yield a new hidden temp file next to ``path`` and move it onto ``path`` only if
    the block succeeds. The rename replaces whatever entry ``path`` is, a symlink
    included, and never writes through it. The temp suffix is ``path``'s in lower case,
    the form writers recognise (np.save given a name ending '.NPY' appends '.npy')."""
    tmp = _create_new_file(path.parent, lambda: f".{path.stem}.partial-{uuid.uuid4().hex[:8]}{path.suffix.lower()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _PlainWriter:
    """A file numpy does not take for a real one, so np.save writes through Python's
    ``write`` (16 MiB chunks), whose OSError keeps its errno; on a real file it uses
    ndarray.tofile, which reports a failed write only as "N requested and M written"."""

    def __init__(self, fh: Any):
        self.write = fh.write


def _write_npy(frames: np.ndarray, path: Path) -> None:
    # Through a file object: np.save given a name may append '.npy' to it.
    with open(path, "wb") as fh:
        np.save(_PlainWriter(fh), frames)


def _write_png_folder(frames: np.ndarray, folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index, frame in enumerate(frames):
        # Each frame through its own temp file: a symlink planted at the frame name is
        # replaced, not followed onto its target.
        with _atomic_output(folder / f"frame_{index:05d}.png") as tmp:
            # compress_level 1: several times faster than the default 6 for ~10% larger files.
            Image.fromarray(to_uint8(frame)).save(tmp, format="PNG", compress_level=1)


def gif_durations_ms(num_frames: int, fps: Fraction) -> list[int]:
    """Per-frame GIF delays in ms. GIF counts in centiseconds, so 16 fps (6.25 cs) cannot
    be one constant delay; rounding each frame's *start time* instead gives delays like
    60, 60, 60, 70 ms whose running sum stays within 5 ms of the true timeline."""
    starts_cs = [round(index * 100 / fps) for index in range(num_frames + 1)]
    delays_cs = [max(b - a, GIF_MIN_DELAY_CS) for a, b in zip(starts_cs, starts_cs[1:])]
    return [10 * d for d in delays_cs]


def _write_gif(frames: np.ndarray, path: Path, fps: Fraction) -> None:
    from PIL import Image

    if fps > 100 / GIF_MIN_DELAY_CS:
        logger.warning("GIF cannot play faster than %d fps; %s fps is slowed down", 100 // GIF_MIN_DELAY_CS, fps)
    palette = _gif_palette(frames)
    # One shared palette, no dithering: per-frame palettes make colours flicker between
    # frames, and Pillow's default per-frame quantisation is ~50x slower (minutes for
    # 81 frames of 832x480). Dithering would add shimmer and quadruple the file size.
    images = [Image.fromarray(to_uint8(frame)).quantize(palette=palette, dither=Image.Dither.NONE) for frame in frames]
    # Pillow merges identical consecutive frames into one with the summed delay (plays the same).
    images[0].save(
        path,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=gif_durations_ms(len(images), fps),
        loop=0,  # loop forever
    )


def _gif_palette(frames: np.ndarray, max_samples: int = 8, pixels_per_sample: int = 32768):
    """A 256-colour median-cut palette (a "P" image) fitted to a spatially subsampled
    mosaic of up to ``max_samples`` frames spread over the clip."""
    from PIL import Image

    t, h, w, _ = frames.shape
    stride = max(1, round(math.sqrt(h * w / pixels_per_sample)))
    picks = np.unique(np.linspace(0, t - 1, min(t, max_samples)).round().astype(int))
    mosaic = np.concatenate([to_uint8(frames[i, ::stride, ::stride]) for i in picks], axis=0)  # (k*h', w', 3)
    return Image.fromarray(mosaic).quantize(256, method=Image.Quantize.MEDIANCUT)


def mp4_output_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) of the encoded MP4: the input size, rounded up to even."""
    return height + height % 2, width + width % 2


def _write_mp4(frames: np.ndarray, path: Path, fps: Fraction, crf: int, preset: str) -> None:
    t, h, w, _ = frames.shape
    out_h, out_w = mp4_output_size(h, w)
    if (out_h, out_w) != (h, w):
        logger.warning("MP4 needs even sizes: padding %dx%d frames to %dx%d by edge replication", w, h, out_w, out_h)
    command = _x264_command(out_w, out_h, fps, crf, preset, path)
    _run_encoder(command, (pad_to_even(to_uint8(frame)) for frame in frames))


def _x264_command(width: int, height: int, fps: Fraction, crf: int, preset: str, path: Path) -> list[str]:
    import imageio_ffmpeg

    # Convert with the BT.709 matrix and tag the stream so: browsers assume BT.709 for
    # untagged HD video, while ffmpeg's default RGB->YUV matrix is BT.601, which shifts
    # colours visibly. With the tags every decoder converts back with the right matrix.
    color = (
        "scale=out_color_matrix=bt709:out_range=tv,"
        "setparams=colorspace=bt709:color_primaries=bt709:color_trc=bt709:range=tv"
    )
    return [
        imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-y", "-v", "error",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "-",
        "-an", "-vf", color,
        "-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", preset, "-crf", str(crf),
        "-movflags", "+faststart",  # index at the front: playable while still downloading
        "-f", "mp4", _ffmpeg_url(path),
    ]


def _ffmpeg_url(path: Path) -> str:
    """``path`` as an absolute ``file:`` URL. ffmpeg takes a name with a colon
    ('pipe:x.mp4', 'http:x') for a URL of that protocol, while after 'file:' the rest is
    a path, used as is."""
    return "file:" + os.path.abspath(path)


def _run_encoder(command: list[str], frames: Iterator[np.ndarray]) -> None:
    """Pipe raw frames into ffmpeg; raise VideoEncodingError with its log if it fails."""
    # stderr goes to a file, not a pipe: a pipe nobody drains can fill and deadlock us.
    with tempfile.TemporaryFile() as log:
        try:
            process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log)
        except OSError as exc:
            # A broken install, not a failure to write the output.
            raise VideoEncodingError(f"cannot start ffmpeg: {exc}") from exc
        try:
            # A broken pipe means ffmpeg exited early; its status and log below say why.
            with contextlib.suppress(BrokenPipeError):
                for frame in frames:
                    process.stdin.write(np.ascontiguousarray(frame).data)
            with contextlib.suppress(BrokenPipeError):
                process.stdin.close()
        except BaseException:
            process.kill()
            process.wait()
            raise
        status = process.wait()
        if status != 0:
            log.seek(0)
            tail = log.read().decode(errors="replace").strip()[-2000:]
            if 0 < status and 256 - status in WRITE_ERRNOS:
                # ffmpeg exits with its error code, -errno, as an 8-bit status (228: -ENOSPC): the
                # output could not be written, a condition the caller may wait out, not a bad encode
                raise OSError(256 - status, f"{os.strerror(256 - status)} (ffmpeg: {tail[-300:]})")
            raise VideoEncodingError(f"ffmpeg {_exit_text(status)}: {tail or '(no output)'}")


def _exit_text(status: int) -> str:
    # A killed ffmpeg logs nothing; the signal says why (SIGXFSZ: the file size limit).
    if status < 0:
        return f"was killed by signal {-status} ({signal.strsignal(-status) or 'unknown'})"
    return f"exited with status {status}"


# ---------------------------------------------------------------- reading


def _ffmpeg_verdict(exc: Exception) -> str:
    """The last line of an imageio_ffmpeg error, ffmpeg's own reason, without the banner
    of build options that the whole message carries."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and "=== stderr ===" not in line]
    return lines[-1] if lines else repr(exc)


def _check_frame_count(path: Path, decoded: int, meta: dict[str, Any]) -> None:
    """Raise VideoDecodingError where fewer frames decoded than the container's duration
    x fps. ffmpeg prints the duration to 1/100 s and a fractional fps to 2 decimals, so
    that product is exact to 0.005 x (duration + fps) frames; one frame more of slack
    allows for muxers that count the last frame's duration differently."""
    duration, fps = meta["duration"], meta["fps"]
    # The container's duration is its longest stream's: with audio, maybe not the video's.
    if not duration or not fps or "audio_codec" in meta:
        return
    expected = duration * fps
    if decoded < expected - 1 - 0.005 * (duration + fps):
        raise VideoDecodingError(f"{path} is truncated or corrupt: decoded {decoded} of {round(expected)} frames")
