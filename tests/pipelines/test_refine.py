"""Two-stage generation (base pass at 1/scale, refine pass at full size): shapes, determinism, the
base pass equal to an ordinary small generation, the refine start equal to its formula, and bad
refine options rejected before any work."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vidloom import InvalidRequestError, RefineParams

SIZE = dict(height=64, width=96, num_frames=9)
REFINE = RefineParams(scale=2, strength=0.5, steps=3)


def test_shapes_phases_and_callback(tiny_generator):
    seen = []
    out = tiny_generator.generate("a cat", num_inference_steps=4, refine=REFINE, output_type="np",
                                  callback=lambda step, total, t, latents: seen.append((step, total, latents.shape)),
                                  **SIZE)
    assert out.frames.shape == (9, 64, 96, 3)
    assert out.latents.shape == (1, 4, 3, 8, 12)
    # 4 base steps on 4 x 6 latents, then 3 refine steps on 8 x 12
    assert [(s, n) for s, n, _ in seen] == [(1, 4), (2, 4), (3, 4), (4, 4), (1, 3), (2, 3), (3, 3)]
    assert {shape[-2:] for _, _, shape in seen[:4]} == {(4, 6)} and {shape[-2:] for _, _, shape in seen[4:]} == {(8, 12)}


def test_deterministic_and_seeded(tiny_generator):
    kwargs = dict(num_inference_steps=3, refine=REFINE, **SIZE)
    a = tiny_generator.generate("a cat", seed=1, **kwargs).frames
    b = tiny_generator.generate("a cat", seed=1, **kwargs).frames
    c = tiny_generator.generate("a cat", seed=2, **kwargs).frames
    assert (a == b).all()
    assert not (a == c).all()


def test_refine_changes_the_video_and_dict_options_work(tiny_generator):
    kwargs = dict(num_inference_steps=3, seed=1, **SIZE)
    one = tiny_generator.generate("a cat", **kwargs).frames
    two = tiny_generator.generate("a cat", refine={"scale": 2, "strength": 0.5, "steps": 3}, **kwargs).frames
    assert one.shape == two.shape and not (one == two).all()


def test_base_pass_is_the_small_generation_and_refine_starts_from_its_formula(tiny_generator):
    """Step the task unit by unit: after the base pass its latents are those of an ordinary
    generation at half the size; after the refine unit they are (1 - s) up(base) + s noise(seed + 1),
    s the refine schedule's level where the refine pass begins."""
    small = tiny_generator.generate("a cat", num_inference_steps=4, seed=5, output_type="latent",
                                    height=32, width=48, num_frames=9).latents
    task = tiny_generator.submit("a cat", num_inference_steps=4, seed=5, refine=REFINE, **SIZE)
    while not any(name == "refine" for name in task.timings):
        tiny_generator.step(task)
    batch = task.batch
    schedule = tiny_generator.pipeline.components["scheduler"].schedule(6)  # 3 steps at strength 0.5
    assert batch.begin_index == 3 and torch.equal(batch.timesteps, schedule.timesteps)
    sigma = schedule.sigmas[3]
    noise = torch.randn((1, 4, 3, 8, 12), generator=torch.Generator().manual_seed(6))
    expected = (1 - sigma) * F.interpolate(small, scale_factor=(1, 2, 2), mode="trilinear") + sigma * noise
    assert torch.allclose(batch.latents, expected, rtol=0, atol=1e-6)
    assert (batch.params.height, batch.params.width) == (64, 96)
    tiny_generator.run(task)
    assert task.status == "done" and task.result.frames.shape == (9, 64, 96, 3)


@pytest.mark.parametrize("refine, field", [
    (RefineParams(scale=3), "height"),  # 64 / 3 is no size
    (RefineParams(scale=0), "refine.scale"),
    (RefineParams(strength=0.0), "refine.strength"),
    (RefineParams(strength=1.5), "refine.strength"),
    (RefineParams(steps=0), "refine.steps"),
    (RefineParams(steps=900, strength=0.5), "refine.strength"),  # a 1800-step schedule
    (RefineParams(guidance_scale=-1.0), "refine.guidance_scale"),
    ({"scale": 2, "strenght": 0.5}, "refine.strenght"),
    ("2x", "refine"),
], ids=["size", "scale", "strength-0", "strength-1.5", "steps", "schedule", "guidance", "unknown-key", "type"])
def test_bad_refine_options_fail_before_work(tiny_generator, refine, field):
    with pytest.raises(InvalidRequestError) as err:
        tiny_generator.submit("a cat", num_inference_steps=4, refine=refine, **SIZE)
    assert err.value.field == field
    assert tiny_generator.generate("a cat", num_inference_steps=1, **SIZE).frames.shape == (9, 64, 96, 3)


def test_refine_guidance_needs_the_negative_prompt(tiny_generator):
    with pytest.raises(InvalidRequestError, match="negative prompt") as err:
        tiny_generator.submit("a cat", guidance_scale=1.0, refine=RefineParams(guidance_scale=5.0), **SIZE)
    assert err.value.field == "refine.guidance_scale"
    # the other way round is fine: guided base pass, unguided refine pass
    out = tiny_generator.generate("a cat", num_inference_steps=2, guidance_scale=5.0,
                                  refine=RefineParams(guidance_scale=1.0, steps=1), **SIZE)
    assert out.frames.shape == (9, 64, 96, 3)


# --- a second model folder for the refine pass (EngineConfig.refine_model) ---------------------


@pytest.fixture(scope="module")
def other_dir(tiny_wan_pipe, tmp_path_factory):
    """A T2V folder like the tiny one with a transformer of its own weights."""
    from diffusers import WanPipeline, WanTransformer3DModel

    from vidloom import tiny

    folder = tmp_path_factory.mktemp("other")
    torch.manual_seed(9)
    parts = {k: getattr(tiny_wan_pipe, k) for k in ("tokenizer", "text_encoder", "vae", "scheduler")}
    WanPipeline(**parts, transformer=WanTransformer3DModel(**tiny.TINY_TRANSFORMER)).save_pretrained(str(folder))
    return folder


def test_refine_model_runs_the_refine_pass(tiny_wan_dir, tiny_generator, other_dir):
    from vidloom import VideoGenerator

    kwargs = dict(num_inference_steps=3, seed=1, refine=REFINE, **SIZE)
    same = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", refine_model=str(tiny_wan_dir))
    assert (same.generate("a cat", **kwargs).frames == tiny_generator.generate("a cat", **kwargs).frames).all()
    other = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", refine_model=other_dir)
    refine_stage = other.pipeline.stages[[s.name for s in other.pipeline.stages].index("denoising_2")]
    assert refine_stage.experts[0].transformer is not other.pipeline.denoising.experts[0].transformer
    assert "text_encoder" in other.pipeline.components  # the refine folder's own are not loaded
    assert not (other.generate("a cat", **kwargs).frames == tiny_generator.generate("a cat", **kwargs).frames).all()
    # without refine the second model is not used
    plain = dict(num_inference_steps=2, seed=1, **SIZE)
    assert (other.generate("a cat", **plain).frames == tiny_generator.generate("a cat", **plain).frames).all()


def test_low_noise_expert_folder_refines_below_its_boundary(tiny_wan_dir, tiny_wan_pipe, tmp_path):
    """The Wan2.2 way: the refine pass by a folder holding only the low-noise expert
    (transformer null, boundary 0.9 x 1000): a refine schedule starting below 900 runs, one
    starting above is refused at submit, naming the refine strength."""
    import json

    from diffusers import WanPipeline, WanTransformer3DModel

    from vidloom import VideoGenerator, tiny

    folder = tmp_path / "low"
    torch.manual_seed(4)
    parts = {k: getattr(tiny_wan_pipe, k) for k in ("tokenizer", "text_encoder", "vae", "scheduler")}
    WanPipeline(**parts, transformer=None, transformer_2=WanTransformer3DModel(**tiny.TINY_TRANSFORMER),
                boundary_ratio=0.9).save_pretrained(str(folder))
    assert json.loads((folder / "model_index.json").read_text())["transformer"] == [None, None]
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", refine_model=folder)
    out = gen.generate("a cat", num_inference_steps=3, refine=RefineParams(strength=0.5, steps=3), **SIZE)
    assert out.frames.shape == (9, 64, 96, 3)  # refine timesteps 750, 600, 376
    with pytest.raises(InvalidRequestError, match="no high-noise transformer") as err:
        gen.submit("a cat", num_inference_steps=3, refine=RefineParams(strength=1.0, steps=3), **SIZE)
    assert err.value.field == "refine.strength"


def test_refine_model_that_does_not_fit(tiny_wan_dir, tiny_wan_pipe, tmp_path):
    from vidloom import EngineConfig, ModelLoadError, VideoGenerator

    from ..parity.test_ti2v_parity import build_ti2v_folder

    ti2v = build_ti2v_folder(tiny_wan_pipe, tmp_path / "ti2v")  # another latent space (6 channels, 16x)
    with pytest.raises(ModelLoadError, match="refine_model does not fit the base model: vae z_dim is 6 there, 4 here"):
        VideoGenerator.request_limits(tiny_wan_dir, EngineConfig(refine_model=str(ti2v)))
    with pytest.raises(ModelLoadError, match="model folder does not exist"):
        VideoGenerator.from_pretrained(tiny_wan_dir, refine_model=str(tmp_path / "missing"))
