"""Stages and the composed pipeline.

A stage is built with the modules it needs and turns a batch into a batch. It checks what
it receives and what it produces (``verify_input`` / ``verify_output``), so a wiring or
shape mistake surfaces as an error naming the stage and the field, not as a wrong video.
An iterative stage (denoising) also exposes ``step`` so a task can advance one unit at a time.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterator

import torch

from ..config import RequestLimits
from ..errors import VidloomError
from .batch import ForwardBatch


class StageVerificationError(VidloomError):
    """A stage received or produced a batch that breaks its contract."""


class VerificationResult:
    """Collects named checks; ``raise_if_failed`` reports every failed one."""

    def __init__(self, stage: str, when: str):
        self.stage, self.when = stage, when
        self.failures: list[str] = []

    def check(self, field_name: str, ok: bool, expectation: str) -> "VerificationResult":
        if not ok:
            self.failures.append(f"{field_name} {expectation}")
        return self

    def raise_if_failed(self) -> None:
        if self.failures:
            raise StageVerificationError(f"{self.stage} {self.when}: " + "; ".join(self.failures))


def is_tensor(x, ndim: int | None = None) -> bool:
    return isinstance(x, torch.Tensor) and (ndim is None or x.ndim == ndim)


class Phase(str, enum.Enum):
    """What part of a generation a stage does; a task reports its state by it."""

    ENCODING = "encoding"  # everything before the denoising loop
    DENOISING = "denoising"
    DECODING = "decoding"


class PipelineStage:
    """``name`` is the class's default; a pipeline makes it unique per instance (two denoising
    stages become "denoising" and "denoising_2"), so timings and lookups never collide."""

    name: str = "stage"
    phase: Phase = Phase.ENCODING
    iterative: bool = False

    def verify_input(self, batch: ForwardBatch) -> VerificationResult:
        return VerificationResult(self.name, "input")

    def verify_output(self, batch: ForwardBatch) -> VerificationResult:
        return VerificationResult(self.name, "output")

    def forward(self, batch: ForwardBatch) -> ForwardBatch:
        raise NotImplementedError

    def num_units(self, batch: ForwardBatch) -> int:
        """Units of work ``step`` runs this stage in (1 for a plain stage; 0: none for this batch)."""
        return 1

    def __call__(self, batch: ForwardBatch) -> ForwardBatch:
        self.verify_input(batch).raise_if_failed()
        start = time.perf_counter()
        batch = self.forward(batch)
        batch.timings[self.name] = batch.timings.get(self.name, 0.0) + time.perf_counter() - start
        self.verify_output(batch).raise_if_failed()
        return batch


class IterativeStage(PipelineStage):
    """A stage made of ``num_units`` steps; ``step(batch, i)`` runs step i."""

    iterative = True

    def step(self, batch: ForwardBatch, index: int) -> ForwardBatch:
        raise NotImplementedError

    def begin(self, batch: ForwardBatch) -> ForwardBatch:
        """Called once before the first step (default: verify the input)."""
        self.verify_input(batch).raise_if_failed()
        return batch

    def end(self, batch: ForwardBatch) -> ForwardBatch:
        """Called once after the last step (default: verify the output)."""
        self.verify_output(batch).raise_if_failed()
        return batch

    def forward(self, batch: ForwardBatch) -> ForwardBatch:
        for i in range(self.num_units(batch)):
            batch = self.step(batch, i)
        return batch

    def __call__(self, batch: ForwardBatch) -> ForwardBatch:
        batch = self.begin(batch)
        start = time.perf_counter()
        batch = self.forward(batch)
        batch.timings[self.name] = batch.timings.get(self.name, 0.0) + time.perf_counter() - start
        return self.end(batch)


class WorkUnit:
    """One schedulable unit: a stage (or one step of an iterative stage) applied to a batch."""

    def __init__(self, stage: PipelineStage, index: int, total: int, run: Callable[[ForwardBatch], ForwardBatch]):
        self.stage, self.index, self.total, self.run = stage, index, total, run

    @property
    def label(self) -> str:
        return self.stage.name if self.total == 1 else f"{self.stage.name} {self.index + 1}/{self.total}"


def parallel_parts(parallel) -> tuple[object | None, object | None]:
    """The sequence-parallel and CFG-parallel objects of a ``parallel.ParallelState`` (None, None in one process)."""
    if parallel is None:
        return None, None
    from ..parallel.cfg import CFGParallel
    from ..parallel.sequence import UlyssesSequenceParallel

    sequence = UlyssesSequenceParallel(parallel.sp_group, parallel.sp_size, parallel.sp_rank) \
        if parallel.sp_size > 1 else None
    cfg = CFGParallel(parallel.cfg_group, parallel.cfg_rank) if parallel.cfg_degree > 1 else None
    return sequence, cfg


def tile_spreader(parallel):
    """The parallel VAE decode's ``map_tiles`` over all processes (None in one process)."""
    if parallel is None:
        return None
    from ..parallel.vae import TileSpreader

    return TileSpreader()


class ComposedPipeline:
    """An ordered list of stages. Subclasses only wire stages (see ``pipelines/wan.py``)."""

    def __init__(self, stages: list[PipelineStage], limits: RequestLimits):
        seen: dict[str, int] = {}
        for stage in stages:
            seen[stage.name] = count = seen.get(stage.name, 0) + 1
            if count > 1:
                stage.name = f"{stage.name}_{count}"  # an instance attribute: this stage only
        self.stages = stages
        self.limits = limits  # what a request may ask of these models

    def validate_request(self, params) -> None:
        """Check a request cheaply, before any work (subclasses with an input stage override)."""
        params.validate(self.limits)

    def run(self, batch: ForwardBatch) -> ForwardBatch:
        for stage in self.stages:
            if stage.num_units(batch):  # an iterative stage with no steps for this request is skipped
                batch = stage(batch)
        return batch

    def units(self, batch: ForwardBatch) -> Iterator[WorkUnit]:
        """The units of work of ``batch``, in order; each is timed and verified like ``run``."""
        for stage in self.stages:
            total = stage.num_units(batch)  # 0: nothing to do for this request (a refine pass without refine)
            if not stage.iterative:
                if total:
                    yield WorkUnit(stage, 0, 1, stage)
                continue
            for i in range(total):
                yield WorkUnit(stage, i, total, _iterative_unit(stage, i, total))

    def total_units(self, batch: ForwardBatch) -> int:
        return sum(stage.num_units(batch) for stage in self.stages)


def _iterative_unit(stage: IterativeStage, index: int, total: int):
    def run(batch: ForwardBatch) -> ForwardBatch:
        if index == 0:
            batch = stage.begin(batch)
        start = time.perf_counter()
        batch = stage.step(batch, index)
        batch.timings[stage.name] = batch.timings.get(stage.name, 0.0) + time.perf_counter() - start
        if index == total - 1:
            batch = stage.end(batch)
        return batch

    return run
