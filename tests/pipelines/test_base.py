"""The composed pipeline: stage names unique per instance, phases, units of work at a cursor, and
the unit runner (a failed unit leaves its batch as it was)."""

from __future__ import annotations

import pytest

from vidloom.config import RequestLimits, SamplingParams
from vidloom.pipelines.base import ComposedPipeline, IterativeStage, Phase, PipelineStage, run_units
from vidloom.pipelines.batch import ForwardBatch


class Add(PipelineStage):
    name = "add"

    def __init__(self, amount: int):
        self.amount = amount

    def forward(self, batch):
        batch.step_index += self.amount
        return batch


class Loop(IterativeStage):
    name = "loop"
    phase = Phase.DENOISING

    def __init__(self, units: int = 3):
        self.units = units

    def num_units(self, batch):
        return self.units

    def step(self, batch, index):
        batch.step_index += 100
        return batch


def run_all(pipe, batch):
    cursor, labels = (0, 0), []
    while (unit := pipe.unit_at(batch, cursor)) is not None:
        [batch] = run_units([unit], [batch])
        labels.append(f"{unit.stage.name} {unit.index + 1}/{unit.total}")
        cursor = unit.next_cursor
    return batch, labels


def test_two_stages_of_one_class_get_names_of_their_own():
    first, second, third = Add(1), Add(10), Loop()
    pipe = ComposedPipeline([first, second, third, Loop(0), Loop()], RequestLimits())
    assert [s.name for s in pipe.stages] == ["add", "add_2", "loop", "loop_2", "loop_3"]
    assert Add.name == "add" and Add(5).name == "add"  # the class default is untouched
    batch, labels = run_all(pipe, ForwardBatch(params=SamplingParams()))
    assert batch.step_index == 611
    assert set(batch.timings) == {"add", "add_2", "loop", "loop_3"}
    # a stage without units for this batch (loop_2) is passed over
    assert labels == ["add 1/1", "add_2 1/1", "loop 1/3", "loop 2/3", "loop 3/3",
                      "loop_3 1/3", "loop_3 2/3", "loop_3 3/3"]
    assert pipe.unit_at(batch, (0, 0)).stage.phase == Phase.ENCODING
    assert pipe.unit_at(batch, (2, 1)).stage.phase == Phase.DENOISING
    assert pipe.unit_at(batch, (5, 0)) is None


class FailsOnce(Loop):
    """A step that assigns a field, then fails the first time (as an out-of-memory error would)."""

    def __init__(self):
        super().__init__()
        self.failed = False

    def step(self, batch, index):
        batch.step_index += 100
        batch.trajectory.append(index)
        if index == 1 and not self.failed:
            self.failed = True
            raise MemoryError("out of memory")
        return batch


def test_a_failed_unit_leaves_the_batch_as_it_was():
    stage = FailsOnce()
    pipe = ComposedPipeline([stage], RequestLimits())
    batch = ForwardBatch(params=SamplingParams())
    [batch] = run_units([pipe.unit_at(batch, (0, 0))], [batch])
    before = (batch.step_index, list(batch.trajectory), dict(batch.timings))
    with pytest.raises(MemoryError):
        [result] = run_units([pipe.unit_at(batch, (0, 1))], [batch])
        raise result
    assert (batch.step_index, batch.trajectory, batch.timings) == before
    [batch] = run_units([pipe.unit_at(batch, (0, 1))], [batch])  # run again: it goes on
    [batch] = run_units([pipe.unit_at(batch, (0, 2))], [batch])
    assert batch.step_index == 300 and batch.trajectory == [0, 1, 2]
