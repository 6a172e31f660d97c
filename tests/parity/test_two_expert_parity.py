"""Wan2.2's two-expert text-to-video (transformer for high noise, transformer_2 below
boundary_ratio x num_train_timesteps) against diffusers' WanPipeline with the same folder and
initial latents; and what such a folder may and may not hold."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from vidloom import InvalidRequestError, ModelLoadError, VideoGenerator

from .test_generate_parity import FP32_RTOL, SIZE, initial_latents, rel_err

BOUNDARY = 0.5  # mid-schedule: UniPC's timesteps run from 999 down, so both experts take steps


@pytest.fixture(scope="module")
def two_expert_dir(tiny_wan_dir, tiny_wan_pipe, tmp_path_factory):
    from diffusers import WanPipeline, WanTransformer3DModel

    from vidloom import tiny

    folder = tmp_path_factory.mktemp("two_expert")
    torch.manual_seed(1)  # a low-noise expert with weights of its own
    low_noise = WanTransformer3DModel(**tiny.TINY_TRANSFORMER)
    parts = {k: getattr(tiny_wan_pipe, k) for k in ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")}
    WanPipeline(**parts, transformer_2=low_noise, boundary_ratio=BOUNDARY).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def reference(two_expert_dir):
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(str(two_expert_dir), dtype=torch.float32)


@pytest.fixture(scope="module")
def ours(two_expert_dir):
    return VideoGenerator.from_pretrained(two_expert_dir, dtype="fp32")


@pytest.mark.parametrize("guidance,guidance_2", [(4.0, 2.0), (3.0, None), (5.0, 1.0)])
def test_two_experts_match_wanpipeline_fp32(ours, reference, guidance, guidance_2):
    latents = initial_latents(5)
    kwargs = dict(num_inference_steps=6, guidance_scale=guidance, **SIZE)
    mine = ours.generate("a red circle moving left", negative_prompt="blurry", latents=latents,
                         guidance_scale_2=guidance_2, **kwargs)
    ref = reference(prompt="a red circle moving left", negative_prompt="blurry", latents=latents.clone(),
                    guidance_scale_2=guidance_2, output_type="np", **kwargs).frames[0]
    assert rel_err(mine.frames, ref) <= FP32_RTOL


def test_each_expert_serves_its_timesteps(ours):
    stage = ours.pipeline.denoising
    high, low = (ours.pipeline.components[name] for name in ("transformer", "transformer_2"))
    assert [e.transformer.name for e in stage.experts] == ["transformer", "transformer_2"]
    calls = []
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: calls.append(name))
             for name, m in (("high", high), ("low", low))]
    try:
        task = ours.submit("a cat", num_inference_steps=6, guidance_scale=4.0, **SIZE)
        timesteps = []
        while not task.is_finished:
            ours.step(task)
            if task.batch.timesteps is not None and task.state.value == "denoising":
                timesteps.append(float(task.batch.timesteps[task.batch.step_index - 1]))
    finally:
        for h in hooks:
            h.remove()
    boundary = BOUNDARY * 1000
    assert calls == ["high" if t >= boundary else "low" for t in timesteps]
    assert "high" in calls and "low" in calls


def test_second_guidance_scale_changes_only_the_low_noise_steps(ours):
    latents = initial_latents(6)
    kwargs = dict(num_inference_steps=6, guidance_scale=4.0, latents=latents, output_type="latent", **SIZE)
    same = ours.generate("a cat", guidance_scale_2=4.0, **kwargs).latents
    default = ours.generate("a cat", **kwargs).latents
    other = ours.generate("a cat", guidance_scale_2=1.5, **kwargs).latents
    assert torch.equal(same, default)  # None means guidance_scale, as in diffusers
    assert not torch.allclose(other, default)


def test_guidance_scale_2_needs_two_experts(tiny_wan_dir):
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32")
    with pytest.raises(InvalidRequestError) as err:
        gen.submit("a cat", guidance_scale_2=2.0, **SIZE)
    assert err.value.field == "guidance_scale_2" and "one transformer" in str(err.value)


def _edit_index(folder, **changes):
    path = folder / "model_index.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("value", [0, 1.5, -0.2, "0.5", True])
def test_boundary_ratio_outside_the_unit_interval(two_expert_dir, tmp_path, value):
    folder = tmp_path / "m"
    shutil.copytree(two_expert_dir, folder)
    _edit_index(folder, boundary_ratio=value)
    with pytest.raises(ModelLoadError, match=r"boundary_ratio: must be a number in \(0, 1\]"):
        VideoGenerator.request_limits(folder)


def test_missing_transformer_2_files(two_expert_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(two_expert_dir, folder)
    (folder / "transformer_2" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no safetensors weights found") as err:
        VideoGenerator.request_limits(folder)
    assert "transformer_2" in err.value.file


def test_transformer_2_without_boundary_ratio(two_expert_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(two_expert_dir, folder)
    _edit_index(folder, boundary_ratio=None)
    with pytest.raises(ModelLoadError, match="transformer_2' is given but the settings never use it"):
        VideoGenerator.request_limits(folder)


def test_experts_that_do_not_fit(two_expert_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(two_expert_dir, folder)
    config = folder / "transformer_2" / "config.json"
    data = json.loads(config.read_text())
    data["rope_max_seq_len"] = 32
    config.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="transformer rope_max_seq_len=64 but transformer_2 rope_max_seq_len=32"):
        VideoGenerator.request_limits(folder)


def test_frames_differ_from_one_expert(ours, tiny_wan_dir):
    """A check that the second expert is not a copy of the first (else parity proves little)."""
    one = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32")
    latents = initial_latents(5)
    kwargs = dict(num_inference_steps=6, guidance_scale=4.0, latents=latents, **SIZE)
    assert rel_err(ours.generate("a cat", **kwargs).frames, one.generate("a cat", **kwargs).frames) > 1e-3
    assert np.isfinite(ours.generate("a cat", **kwargs).frames).all()


def test_cli_second_guidance_scale_and_info(ours, two_expert_dir, tmp_path, capsys):
    from vidloom.cli import main

    out = tmp_path / "v.npy"
    assert main(["generate", "--model", str(two_expert_dir), "--prompt", "a cat", "--output", str(out), "--quiet",
                 "--height", "32", "--width", "48", "--num-frames", "9", "--steps", "4", "--guidance-scale", "4",
                 "--guidance-scale-2", "2", "--seed", "3", "--dtype", "fp32"]) == 0
    api = ours.generate("a cat", num_inference_steps=4, guidance_scale=4.0, guidance_scale_2=2.0, seed=3, **SIZE)
    assert np.array_equal(np.load(out), api.frames)
    assert main(["info", "--model", str(two_expert_dir)]) == 0
    assert "variant: Wan2.2 two-expert text-to-video (transformer while timestep >= 0.5" in capsys.readouterr().out


def _low_noise_only(two_expert_dir, folder, boundary):
    shutil.copytree(two_expert_dir, folder)
    shutil.rmtree(folder / "transformer")
    _edit_index(folder, transformer=[None, None], boundary_ratio=boundary)
    return folder


def test_low_noise_only_folder_matches_diffusers(two_expert_dir, tmp_path):
    """transformer null, only transformer_2: with boundary_ratio 1 every timestep is below the
    boundary, so diffusers runs transformer_2 throughout; so does vidloom."""
    from diffusers import WanPipeline

    folder = _low_noise_only(two_expert_dir, tmp_path / "low", 1.0)
    ours = VideoGenerator.from_pretrained(folder, dtype="fp32")
    assert "transformer" not in ours.pipeline.components and len(ours.pipeline.denoising.experts) == 1
    reference = WanPipeline.from_pretrained(str(folder), dtype=torch.float32)
    assert reference.transformer is None
    latents = initial_latents(5)
    kwargs = dict(num_inference_steps=4, guidance_scale=4.0, guidance_scale_2=3.0, **SIZE)
    mine = ours.generate("a red circle moving left", latents=latents, **kwargs)
    ref = reference(prompt="a red circle moving left", latents=latents.clone(), output_type="np", **kwargs).frames[0]
    assert rel_err(mine.frames, ref) <= FP32_RTOL


def test_low_noise_only_folder_refuses_timesteps_above_the_boundary(two_expert_dir, tmp_path):
    # diffusers would call the missing transformer mid-generation; here it is refused at submit
    ours = VideoGenerator.from_pretrained(_low_noise_only(two_expert_dir, tmp_path / "low", BOUNDARY), dtype="fp32")
    with pytest.raises(InvalidRequestError, match="no high-noise transformer") as err:
        ours.submit("a cat", num_inference_steps=4, **SIZE)
    assert err.value.field == "num_inference_steps"


def test_null_transformer_needs_the_low_noise_expert_and_a_boundary(two_expert_dir, tmp_path):
    folder = _low_noise_only(two_expert_dir, tmp_path / "low", None)
    with pytest.raises(ModelLoadError, match="transformer is null: then the folder needs transformer_2 and a boundary"):
        VideoGenerator.request_limits(folder)


def test_bf16_two_experts_are_close_to_diffusers_fp32(two_expert_dir, reference):
    """Both experts and the text encoder in bf16 (the VAE fp32) against diffusers in fp32: measured
    4.2e-3 on this tiny model."""
    latents = initial_latents(5)
    kwargs = dict(num_inference_steps=6, guidance_scale=4.0, guidance_scale_2=2.0, **SIZE)
    bf16 = VideoGenerator.from_pretrained(two_expert_dir, dtype="bf16", vae_dtype="fp32").generate(
        "a red circle moving left", latents=latents, **kwargs).frames
    ref = reference(prompt="a red circle moving left", latents=latents.clone(), output_type="np", **kwargs).frames[0]
    assert rel_err(bf16, ref) <= 3e-2


def test_offload_experts_keeps_one_expert_on_the_device(two_expert_dir, monkeypatch):
    """offload_experts=True: only the expert of the current step is on the compute device. Here the
    moves are recorded instead of made (the compute device stands in as "meta"); the video is the
    one without offload."""
    from vidloom.memory.expert_offload import ExpertOffload
    from vidloom.memory.levels import LevelResidency

    plain = VideoGenerator.from_pretrained(two_expert_dir, dtype="fp32")
    gen = VideoGenerator.from_pretrained(two_expert_dir, dtype="fp32", offload_experts=True)
    residency = gen.pipeline.residency
    assert isinstance(residency, ExpertOffload) and type(plain.pipeline.residency) is LevelResidency
    assert residency.load_device("transformer_2") == torch.device("cpu")  # it waits in CPU memory
    moves, where = [], {}
    for i, name in enumerate(("transformer", "transformer_2")):
        module = gen.pipeline.components[name]
        where[id(module)] = torch.device("cpu")

        def move(device, i=i, module=module):
            moves.append((i, str(device)))
            where[id(module)] = torch.device(device)
            return module

        monkeypatch.setattr(module, "to", move)
    # pretend the compute device is another one ("meta"), so every placement is a recorded move
    monkeypatch.setattr(residency, "device", torch.device("meta"))
    monkeypatch.setattr(residency, "device_of", lambda module: where[id(module)])
    latents = initial_latents(5)
    kwargs = dict(num_inference_steps=6, guidance_scale=4.0, latents=latents, **SIZE)
    assert np.array_equal(gen.generate("a cat", **kwargs).frames, plain.generate("a cat", **kwargs).frames)
    # the high-noise expert onto the device for the first steps, then off it and the low-noise
    # one on: one switch per request, none per step
    assert moves == [(0, "meta"), (0, "cpu"), (1, "meta")]
