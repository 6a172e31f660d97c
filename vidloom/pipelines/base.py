"""Stages and the composed pipeline.

A stage is built with the modules it needs and turns a batch into a batch. It checks what
it receives and what it produces (``verify_input`` / ``verify_output``), so a wiring or
shape mistake surfaces as an error naming the stage and the field, not as a wrong video.
An iterative stage (denoising) is run one unit (step) at a time, so a task can advance one unit
at a time: a task's place is a cursor (stage position, unit index), ``ComposedPipeline.unit_at``
names the unit there, and ``run_units`` runs it (or several requests' units of one stage).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

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
    """A stage made of ``num_units`` steps; ``step(batch, i)`` runs step i, between ``begin`` and
    ``end``. Steps of several requests with equal ``batch_key`` may run as one ``step_many``."""

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

    def batch_key(self, batch: ForwardBatch, index: int) -> Hashable | None:
        """Requests whose step ``index`` may run together in ``step_many`` have equal keys
        (default None: never)."""
        return None

    def step_many(self, batches: list[ForwardBatch], indices: list[int]) -> list[ForwardBatch | Exception]:
        """One step of each request (equal ``batch_key``): each one's batch, or its own error."""
        raise NotImplementedError


Cursor = tuple[int, int]  # (position of the stage in the pipeline, unit index within it)


@dataclass(frozen=True)
class WorkUnit:
    """One schedulable unit: unit ``index`` of the ``total`` of the stage at ``position`` (a plain
    stage has one, an iterative stage one per step)."""

    stage: PipelineStage
    position: int
    index: int
    total: int

    @property
    def next_cursor(self) -> Cursor:
        return (self.position, self.index + 1) if self.index + 1 < self.total else (self.position + 1, 0)


def run_units(units: list[WorkUnit], batches: list[ForwardBatch]) -> list[ForwardBatch | Exception]:
    """Run ``units[k]`` on ``batches[k]`` (all units of one stage; a plain stage's unit runs alone).

    Each unit works on a copy of its batch, so a unit that fails leaves its batch as it was and can
    be run again. An iterative stage's first unit begins it and its last ends it; one request's
    step is ``step``, several requests' steps one ``step_many`` whose time each request is charged
    an equal share of. Returns each request's new batch, or the exception its unit met (a shared
    step that fails is every request's failure)."""
    stage, work = units[0].stage, [batch.copy() for batch in batches]
    if not stage.iterative:
        return [_attempt(stage, work[0])]
    work = [_attempt(stage.begin, b) if u.index == 0 else b for u, b in zip(units, work)]
    ready = [k for k, b in enumerate(work) if not isinstance(b, Exception)]
    if not ready:
        return work
    start = time.perf_counter()
    stepped = _steps(stage, [units[k].index for k in ready], [work[k] for k in ready])
    share = (time.perf_counter() - start) / len(ready)
    for k, result in zip(ready, stepped):
        if not isinstance(result, Exception):
            result.timings[stage.name] = result.timings.get(stage.name, 0.0) + share
            if units[k].index == units[k].total - 1:
                result = _attempt(stage.end, result)
        work[k] = result
    return work


def _steps(stage: IterativeStage, indices: list[int], batches: list[ForwardBatch]) -> list[ForwardBatch | Exception]:
    if len(batches) == 1:
        return [_attempt(lambda b: stage.step(b, indices[0]), batches[0])]
    try:
        return stage.step_many(batches, indices)
    except Exception as exc:  # noqa: BLE001 - the shared forward failed: it is every request's failure
        return [exc] * len(batches)


def _attempt(run: Callable[[ForwardBatch], ForwardBatch], batch: ForwardBatch) -> ForwardBatch | Exception:
    try:
        return run(batch)
    except Exception as exc:  # noqa: BLE001 - the caller decides whose failure it is
        return exc


def parallel_parts(parallel) -> tuple[object | None, object | None]:
    """The sequence-parallel and CFG-parallel objects of a ``parallel.ParallelState`` (None, None in one process)."""
    if parallel is None:
        return None, None
    from ..parallel.cfg import CFGParallel
    from ..parallel.sequence import RingSequenceParallel, UlyssesSequenceParallel

    sequence = None
    if parallel.ring_size > 1:
        sequence = RingSequenceParallel(parallel.sp_group, parallel.sp_size, parallel.sp_rank, parallel.ulysses_group,
                                        parallel.sp_size // parallel.ring_size, list(parallel.ring_ranks))
    elif parallel.sp_size > 1:
        sequence = UlyssesSequenceParallel(parallel.sp_group, parallel.sp_size, parallel.sp_rank)
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

    def unit_at(self, batch: ForwardBatch, cursor: Cursor) -> WorkUnit | None:
        """The unit of work of ``batch`` at ``cursor``, or the first one after it (a stage without
        units for this request, such as a refine pass without refine, is passed over); None: all done."""
        position, index = cursor
        while position < len(self.stages):
            total = self.stages[position].num_units(batch)
            if index < total:
                return WorkUnit(self.stages[position], position, index, total)
            position, index = position + 1, 0
        return None

    def total_units(self, batch: ForwardBatch) -> int:
        return sum(stage.num_units(batch) for stage in self.stages)

