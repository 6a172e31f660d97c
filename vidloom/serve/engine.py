"""What ``vidloom serve`` needs of the engine it serves: this small interface, which
``VideoGenerator`` implements. The server checks a request in its handler, submits the checked
request when the engine loop claims the job, and advances its tasks together; it never reaches
into the generator's pipeline, stages or components."""

from __future__ import annotations

from typing import Any, Protocol


class Engine(Protocol):
    def check(self, prompt: str = "", **sampling) -> Any:
        """A request checked once (``CheckedRequest``); InvalidRequestError names a bad field."""

    def submit(self, request: Any = "", callback=None, **sampling) -> Any:
        """A checked request (or a prompt and options, checked here) queued as a task."""

    def step_many(self, tasks: list) -> list[int]:
        """One unit of work of each task, compatible denoising steps as one forward; a task that
        fails fails alone. Returns the sizes of the shared forwards."""

    def step_quietly(self, task: Any) -> None:
        """One unit of work of ``task``, its failure left on the task."""
