"""The composed pipeline: stage names unique per instance, phases, units of work."""

from __future__ import annotations

from vidloom.config import RequestLimits, SamplingParams
from vidloom.pipelines.base import ComposedPipeline, IterativeStage, Phase, PipelineStage
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

    def num_units(self, batch):
        return 3

    def step(self, batch, index):
        batch.step_index += 100
        return batch


def test_two_stages_of_one_class_get_names_of_their_own():
    first, second, third = Add(1), Add(10), Loop()
    pipe = ComposedPipeline([first, second, third, Loop()], RequestLimits())
    assert [s.name for s in pipe.stages] == ["add", "add_2", "loop", "loop_2"]
    assert Add.name == "add" and Add(5).name == "add"  # the class default is untouched
    batch = pipe.run(ForwardBatch(params=SamplingParams()))
    assert batch.step_index == 611
    assert set(batch.timings) == {"add", "add_2", "loop", "loop_2"}
    units = list(pipe.units(ForwardBatch(params=SamplingParams())))
    assert [u.label for u in units] == ["add", "add_2", "loop 1/3", "loop 2/3", "loop 3/3",
                                        "loop_2 1/3", "loop_2 2/3", "loop_2 3/3"]
    assert [u.stage.phase for u in units][:2] == [Phase.ENCODING] * 2
    assert all(u.stage.phase == Phase.DENOISING for u in units[2:])
