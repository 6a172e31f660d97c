"""The shipped models: small, complete, the same video in vidloom and diffusers, and they show
what the demo asks for."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vidloom import VideoGenerator
from vidloom.cli import main as cli_main
from vidloom.default_model import (
    DEFAULT_I2V_MODEL_DIR, DEFAULT_I2V_PROMPT, DEFAULT_MODEL_DIR, DEFAULT_MODEL_SAMPLING, DEFAULT_PROMPT,
    sampling_defaults,
)
from vidloom.demo import main as demo_main, world_first_frame

from .numerics import rel_err

FP32_RTOL = 1e-4  # fp32 parity bound: relative error on the whole video


@pytest.mark.parametrize("folder, expand, limit_mb",
                         [(DEFAULT_MODEL_DIR, False, 30), (DEFAULT_I2V_MODEL_DIR, True, 40)], ids=["t2v", "ti2v"])
def test_shipped_models_are_complete_diffusers_folders_of_bounded_size(folder, expand, limit_mb):
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["expand_timesteps"] is expand
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / name).is_dir(), name
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= limit_mb * 2**20
    assert DEFAULT_MODEL_SAMPLING["height"] >= 64 and DEFAULT_MODEL_SAMPLING["num_frames"] >= 17


def test_the_siblings_share_the_vae_and_text_encoder():
    for name in ("vae", "text_encoder"):
        for file in (DEFAULT_MODEL_DIR / name).iterdir():
            assert file.read_bytes() == (DEFAULT_I2V_MODEL_DIR / name / file.name).read_bytes(), (name, file.name)


def test_vidloom_and_diffusers_make_the_same_video_from_the_shipped_model():
    from diffusers import WanPipeline

    gen = VideoGenerator.from_pretrained(DEFAULT_MODEL_DIR, dtype="fp32")
    pipe = WanPipeline.from_pretrained(str(DEFAULT_MODEL_DIR), dtype=torch.float32)
    latents = torch.randn(1, 16, 5, 16, 16, generator=torch.Generator().manual_seed(1))
    kwargs = dict(height=64, width=64, num_frames=17, num_inference_steps=4, guidance_scale=5.0)
    ours = gen.generate(DEFAULT_PROMPT, latents=latents, **kwargs).frames
    ref = pipe(prompt=DEFAULT_PROMPT, latents=latents.clone(), output_type="np", **kwargs).frames[0]
    assert ours.shape == ref.shape == (17, 64, 64, 3)
    assert rel_err(ours, ref) <= FP32_RTOL


def test_the_distilled_adapter_is_a_diffusers_adapter_giving_the_same_video():
    """``lora/distill-4step.safetensors``: diffusers' ``load_lora_weights`` at 4 steps without
    guidance gives vidloom's video (merged, and unmerged per request), and vidloom takes those
    settings from the file; the adapter changes the video (it is not the base model at 4 steps)."""
    from diffusers import WanPipeline

    from vidloom.default_model import DISTILLED_ADAPTER

    file = DEFAULT_MODEL_DIR / "lora" / f"{DISTILLED_ADAPTER}.safetensors"
    latents = torch.randn(1, 16, 5, 16, 16, generator=torch.Generator().manual_seed(2))
    size = dict(height=64, width=64, num_frames=17)
    pipe = WanPipeline.from_pretrained(str(DEFAULT_MODEL_DIR), dtype=torch.float32)
    pipe.load_lora_weights(str(file), adapter_name="distill")
    ref = pipe(prompt=DEFAULT_PROMPT, latents=latents.clone(), output_type="np", num_inference_steps=4,
               guidance_scale=1.0, **size).frames[0]
    merged = VideoGenerator.from_pretrained(DEFAULT_MODEL_DIR, dtype="fp32", loras=[DISTILLED_ADAPTER])
    out = merged.generate(DEFAULT_PROMPT, latents=latents, **size)
    assert (out.params.num_inference_steps, out.params.guidance_scale) == (4, 1.0)
    assert rel_err(out.frames, ref) <= FP32_RTOL
    gen = VideoGenerator.from_pretrained(DEFAULT_MODEL_DIR, dtype="fp32")
    gen.load_lora(DISTILLED_ADAPTER)
    assert rel_err(gen.generate(DEFAULT_PROMPT, latents=latents, lora=[DISTILLED_ADAPTER], **size).frames,
                   ref) <= FP32_RTOL
    base = gen.generate(DEFAULT_PROMPT, latents=latents, num_inference_steps=4, guidance_scale=1.0, **size).frames
    assert rel_err(base, ref) > 1e-2


def test_vidloom_and_diffusers_make_the_same_video_from_the_image_to_video_sibling():
    from diffusers import WanImageToVideoPipeline, WanPipeline

    gen = VideoGenerator.from_pretrained(DEFAULT_I2V_MODEL_DIR, dtype="fp32")
    t2v = WanPipeline.from_pretrained(str(DEFAULT_I2V_MODEL_DIR), dtype=torch.float32)
    i2v = WanImageToVideoPipeline(**{k: getattr(t2v, k) for k in ("tokenizer", "text_encoder", "transformer", "vae",
                                                                   "scheduler")}, expand_timesteps=True)
    image = Image.fromarray(np.round(world_first_frame(DEFAULT_I2V_PROMPT, 5) * 255).astype(np.uint8))
    latents = torch.randn(1, 16, 5, 16, 16, generator=torch.Generator().manual_seed(2))
    kwargs = dict(height=64, width=64, num_frames=17, num_inference_steps=4, guidance_scale=5.0)
    ours = gen.generate(DEFAULT_I2V_PROMPT, image=image, latents=latents, **kwargs).frames
    ref = i2v(image=image, prompt=DEFAULT_I2V_PROMPT, latents=latents.clone(), output_type="np", **kwargs).frames[0]
    assert ours.shape == ref.shape == (17, 64, 64, 3)
    assert rel_err(ours, ref) <= FP32_RTOL
    # text-to-video from the same folder, as diffusers' WanPipeline
    ours = gen.generate(DEFAULT_PROMPT, latents=latents, **kwargs).frames
    ref = t2v(prompt=DEFAULT_PROMPT, latents=latents.clone(), output_type="np", **kwargs).frames[0]
    assert rel_err(ours, ref) <= FP32_RTOL


def test_demo_videos_show_the_asked_colour_shape_and_motion(tmp_path, capsys):
    out, i2v_out = tmp_path / "demo.npy", tmp_path / "demo_i2v.npy"
    fast = tmp_path / "demo_4step.npy"
    assert demo_main(["--output", str(out), "--i2v-output", str(i2v_out), "--fast-output", str(fast)]) == 0
    printed = capsys.readouterr().out
    assert f"seen in the video (measured from its pixels): {DEFAULT_PROMPT!r}" in printed
    assert f"with --lora distill-4step (4 steps, guidance 1): seen {DEFAULT_PROMPT!r}" in printed
    assert np.load(fast).shape == (17, 64, 64, 3)
    assert f"seen in the video (measured from its pixels): {DEFAULT_I2V_PROMPT!r}; its first frame keeps" in printed
    first = np.asarray(Image.open(tmp_path / "demo_i2v_first_frame.png"), dtype=np.float32) / 255
    video = np.load(i2v_out)
    assert np.load(out).shape == video.shape == (17, 64, 64, 3)
    assert np.abs(video[0] - first).mean() < 0.02  # the given frame is the video's first


def test_generate_without_model_uses_the_shipped_model_at_its_size(tmp_path):
    out = tmp_path / "v.npy"
    assert cli_main(["generate", "--prompt", "a blue square moving down", "--output", str(out), "--quiet",
                     "--steps", "2"]) == 0
    assert np.load(out).shape == (17, 64, 64, 3)


def test_a_shipped_folder_named_by_any_path_keeps_its_settings(tmp_path, monkeypatch, tiny_wan_dir):
    monkeypatch.chdir(DEFAULT_MODEL_DIR.parent)
    assert sampling_defaults("wan-shapes-64") == sampling_defaults(DEFAULT_I2V_MODEL_DIR / ".." / "wan-shapes-64") \
        == sampling_defaults(DEFAULT_I2V_MODEL_DIR) == DEFAULT_MODEL_SAMPLING
    assert sampling_defaults(tiny_wan_dir) == {} and sampling_defaults(tmp_path / "missing") == {}
    out = tmp_path / "v.npy"
    assert cli_main(["generate", "--model", "wan-shapes-64", "--prompt", "a blue square moving down", "--output",
                     str(out), "--quiet", "--steps", "2"]) == 0
    assert np.load(out).shape == (17, 64, 64, 3)  # not the engine's 81 x 480 x 832


def test_generate_with_an_image_and_no_model_uses_the_image_to_video_sibling(tmp_path, capsys):
    first = tmp_path / "first.png"
    Image.fromarray(np.round(world_first_frame("a blue square moving down", 1) * 255).astype(np.uint8)).save(first)
    out = tmp_path / "v.npy"
    assert cli_main(["generate", "--prompt", "a blue square moving down", "--image", str(first), "--output", str(out),
                     "--quiet", "--steps", "2"]) == 0
    video = np.load(out)
    assert video.shape == (17, 64, 64, 3)
    given = np.asarray(Image.open(first), dtype=np.float32) / 255
    assert np.abs(video[0] - given).mean() < 0.02  # the first frame kept even at 2 steps


def test_at_the_default_settings_the_first_frame_has_the_asked_colour():
    """The shipped model's sampling defaults: at guidance 5 and 20 steps its first latent frame
    overshoots (a green circle starts red in frames 0-4); at the default guidance every
    latent-frame span is green."""
    from vidloom.world import score_clip

    gen = VideoGenerator.from_pretrained(DEFAULT_MODEL_DIR, dtype="fp32")
    spans = {}
    for guidance in (DEFAULT_MODEL_SAMPLING["guidance_scale"], 5.0):
        spans[guidance] = [score_clip(gen.generate("a green circle moving down", seed=seed, **dict(
            DEFAULT_MODEL_SAMPLING, guidance_scale=guidance)).frames).span_colors for seed in range(3)]
    assert all(c == "green" for clip in spans[DEFAULT_MODEL_SAMPLING["guidance_scale"]] for c in clip), spans
    assert any(clip[0] != "green" for clip in spans[5.0]), spans  # the defect the default avoids
