"""Video export and reading."""

from vidloom.io.video import (
    OutputWriteError,
    VideoDecodingError,
    VideoEncodingError,
    check_output_path,
    export_video,
    read_video,
    reserve_output_path,
    save_video,
)

__all__ = [
    "OutputWriteError",
    "VideoDecodingError",
    "VideoEncodingError",
    "check_output_path",
    "export_video",
    "read_video",
    "reserve_output_path",
    "save_video",
]
