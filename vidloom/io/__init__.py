"""Video export and reading."""

from vidloom.io.video import VideoEncodingError, export_video, read_video

__all__ = ["VideoEncodingError", "export_video", "read_video"]
