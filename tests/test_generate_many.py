"""Several videos in one ``generate`` call (a list of prompts, ``num_videos_per_prompt``): one
step-batched group whose videos each equal their own ``generate`` call (fp32, relative error
<= 1e-4 over the whole video, the tolerance of tests/pipelines/test_step_many.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vidloom import InvalidRequestError, NumericalError, VideoOutput
from vidloom.generator import MAX_VIDEOS_PER_CALL, video_requests

from .numerics import rel_err
from .pipelines.test_model_call import CountingCall, counting  # noqa: F401 - counting: a fixture

SMALL = dict(height=32, width=48, num_frames=5, num_inference_steps=3, guidance_scale=4.0)
PROMPTS = ["a red circle moving left", "a blue square", "a green triangle moving up quickly"]


def test_three_prompts_in_one_call_equal_three_calls_and_share_steps(tiny_generator, counting):
    alone = [tiny_generator.generate(prompt, seed=7, **SMALL).frames for prompt in PROMPTS]
    forwards_alone = len(counting.sizes)
    counting.calls.clear()
    outs = tiny_generator.generate(PROMPTS, seed=7, **SMALL)
    assert isinstance(outs, list) and len(outs) == 3
    assert [out.params.prompt for out in outs] == PROMPTS
    for out, expected in zip(outs, alone):
        assert rel_err(out.frames, expected) <= 1e-4
    # each request's first step runs alone (2 rows: cond + uncond), the later ones as one forward of 3 x 2 rows
    assert forwards_alone == 3 * SMALL["num_inference_steps"]
    assert len(counting.sizes) < forwards_alone and max(counting.sizes) == 6


def test_num_videos_per_prompt_gives_seeds_s_and_s_plus_one(tiny_generator):
    outs = tiny_generator.generate("a cat", seed=11, num_videos_per_prompt=2, **SMALL)
    assert [out.params.seed for out in outs] == [11, 12]
    assert not np.allclose(outs[0].frames, outs[1].frames)
    for out, seed in zip(outs, (11, 12)):
        assert rel_err(out.frames, tiny_generator.generate("a cat", seed=seed, **SMALL).frames) <= 1e-4


def test_one_prompt_one_video_is_a_single_output_as_before(tiny_generator):
    out = tiny_generator.generate("a cat", **SMALL)
    assert isinstance(out, VideoOutput)
    assert isinstance(tiny_generator.generate(["a cat"], **SMALL), list)  # a list asks for a list


def test_several_videos_to_one_output_path_are_numbered(tiny_generator, tmp_path):
    outs = tiny_generator.generate(["a cat", "a dog"], num_videos_per_prompt=2, output_path=tmp_path / "clip.mp4",
                                   **SMALL)
    names = ["clip-0.mp4", "clip-1.mp4", "clip-2.mp4", "clip-3.mp4"]
    assert [out.path for out in outs] == [tmp_path / name for name in names]
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # no temporary file left
    assert [(out.params.prompt, out.params.seed) for out in outs] == [("a cat", 0), ("a cat", 1), ("a dog", 0),
                                                                      ("a dog", 1)]


def test_numbered_paths_for_a_png_folder_and_a_single_video():
    assert [r.output_path for r in video_requests(["a", "b"], output_path="out/frames")] == ["out/frames-0",
                                                                                            "out/frames-1"]
    assert [r.output_path for r in video_requests(["a"], output_path="out/clip.mp4")] == ["out/clip.mp4"]


@pytest.mark.parametrize("field,prompt,kwargs", [
    ("prompt", [], {}),
    ("prompt", ["a cat", "a\0dog"], {}),
    ("prompt", ["a cat", 3], {}),
    ("num_videos_per_prompt", "a cat", dict(num_videos_per_prompt=0)),
    ("num_videos_per_prompt", "a cat", dict(num_videos_per_prompt=True)),
    ("num_videos_per_prompt", ["a cat"] * 8, dict(num_videos_per_prompt=MAX_VIDEOS_PER_CALL // 8 + 1)),
    ("seed", "a cat", dict(num_videos_per_prompt=2, seed=1.5)),
    ("height", ["a cat", "a dog"], dict(height=33)),
])
def test_a_bad_request_is_rejected_before_any_work(tiny_generator, counting, field, prompt, kwargs):
    calls = []
    hook = tiny_generator.pipeline.residency.loaded("text_encoder").register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(InvalidRequestError) as err:
            tiny_generator.generate(prompt, **{**SMALL, **kwargs})
    finally:
        hook.remove()
    assert err.value.field == field and "\n" not in str(err.value)
    assert calls == [] and counting.sizes == []


def test_a_failing_video_fails_the_call(tiny_generator, monkeypatch):
    stage = tiny_generator.pipeline.denoising
    inner = stage.call

    class Poison(CountingCall):
        def __call__(self, model, x, t, context_kv, rows):
            out = super().__call__(model, x, t, context_kv, rows)
            return out * float("nan") if len(self.calls) == 3 else out  # the first shared step

    monkeypatch.setattr(stage, "call", Poison(inner))
    with pytest.raises(NumericalError, match="NaN"):
        tiny_generator.generate(PROMPTS[:2], **SMALL)
    monkeypatch.setattr(stage, "call", inner)
    assert tiny_generator.generate(PROMPTS[:2], **SMALL)[0].frames.shape == (5, 32, 48, 3)


def test_output_paths_stay_paths(tmp_path):
    r = video_requests(["a", "b"], output_path=Path(tmp_path) / "v.gif")
    assert [Path(x.output_path).name for x in r] == ["v-0.gif", "v-1.gif"]
