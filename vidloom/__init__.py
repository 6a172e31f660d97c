"""vidloom: a video diffusion inference engine for the Wan family of open models."""

from .config import EngineConfig, RefineParams, SamplingParams
from .errors import InvalidRequestError, ModelLoadError, NumericalError, TaskCancelled, VidloomError
from .generator import Task, TaskState, VideoGenerator, VideoOutput
from .request import CheckedRequest

__version__ = "0.1.0"

__all__ = [
    "CheckedRequest", "EngineConfig", "InvalidRequestError", "ModelLoadError", "NumericalError", "RefineParams",
    "SamplingParams", "Task", "TaskCancelled", "TaskState", "VideoGenerator", "VideoOutput", "VidloomError",
]
