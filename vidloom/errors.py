"""One small error hierarchy, so the CLI and the server map failures without string matching."""

from __future__ import annotations


class VidloomError(Exception):
    """Base of every error the engine raises on purpose."""


class InvalidRequestError(VidloomError, ValueError):
    """A request field holds a value the engine cannot serve.

    ``field`` names the offending field, ``allowed`` says what would be accepted.
    """

    def __init__(self, field: str, message: str, allowed: str | None = None):
        self.field = field
        self.allowed = allowed
        text = f"{field}: {message}"
        if allowed:
            text += f" (allowed: {allowed})"
        super().__init__(text)


class ModelLoadError(VidloomError):
    """A model folder, file or checkpoint key is missing, corrupt or does not fit the architecture."""

    def __init__(self, message: str, file: str | None = None, key: str | None = None):
        self.file = file
        self.key = key
        parts = [message]
        if key is not None:
            parts.append(f"key '{key}'")
        if file is not None:
            parts.append(f"in {file}")
        super().__init__(" ".join(parts) if len(parts) == 1 else f"{parts[0]}: " + ", ".join(parts[1:]))


class NumericalError(VidloomError):
    """Non-finite values appeared during generation; ``step`` names the denoising step."""

    def __init__(self, message: str, step: int | None = None):
        self.step = step
        super().__init__(message if step is None else f"step {step}: {message}")


class TaskCancelled(VidloomError):
    """The task was cancelled before it finished."""


class ResourceExhausted(VidloomError, MemoryError):
    """Memory ran out (host or device) while a unit of work ran: the request may fit at a smaller
    size or with a lower-memory configuration; the engine itself is left usable."""


class AdaptersBusy(VidloomError):
    """A request names an adapter that is not in memory, and the ``max_loras`` adapters that are
    are all used by unfinished requests: it can be submitted once one of them finishes."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error: torch's (CUDA's), Python's MemoryError (ours
    included), or torch's CPU allocator's, which is a plain RuntimeError ("DefaultCPUAllocator:
    can't allocate memory") - the one error recognised by more than its type."""
    import torch

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        type(exc) is RuntimeError and "DefaultCPUAllocator: can't allocate memory" in str(exc))


def engine_error(exc: BaseException) -> BaseException:
    """An error raised while a unit of work ran, as the engine's own type where it has one:
    torch's and the allocators' out-of-memory errors become ResourceExhausted (the cause kept).
    The one place an error is recognised by more than its type: torch's CPU allocator raises a
    plain RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(exc, VidloomError) or not is_out_of_memory(exc):
        return exc
    error = ResourceExhausted(f"out of memory: {' '.join(str(exc).split())[:300]}")
    error.__cause__ = exc
    return error
