"""The shipped model: small, complete, the same video in vidloom and diffusers, and it shows
what the demo asks for."""

from __future__ import annotations

import json

import numpy as np
import torch

from vidloom import VideoGenerator
from vidloom.cli import main as cli_main
from vidloom.default_model import DEFAULT_MODEL_DIR, DEFAULT_MODEL_SAMPLING, DEFAULT_PROMPT
from vidloom.demo import main as demo_main


def test_shipped_model_is_a_complete_diffusers_folder_under_30_mb():
    index = json.loads((DEFAULT_MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (DEFAULT_MODEL_DIR / name).is_dir(), name
    size = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.rglob("*") if f.is_file())
    assert size <= 30 * 2**20
    assert DEFAULT_MODEL_SAMPLING["height"] >= 64 and DEFAULT_MODEL_SAMPLING["num_frames"] >= 17


def test_vidloom_and_diffusers_make_the_same_video_from_the_shipped_model():
    from diffusers import WanPipeline

    gen = VideoGenerator.from_pretrained(DEFAULT_MODEL_DIR, dtype="fp32")
    pipe = WanPipeline.from_pretrained(str(DEFAULT_MODEL_DIR), dtype=torch.float32)
    latents = torch.randn(1, 16, 5, 16, 16, generator=torch.Generator().manual_seed(1))
    kwargs = dict(height=64, width=64, num_frames=17, num_inference_steps=4, guidance_scale=5.0)
    ours = gen.generate(DEFAULT_PROMPT, latents=latents, **kwargs).frames
    ref = pipe(prompt=DEFAULT_PROMPT, latents=latents.clone(), output_type="np", **kwargs).frames[0]
    assert ours.shape == ref.shape == (17, 64, 64, 3)
    # fp32 parity bound: relative error <= 1e-4 on the whole video
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= 1e-4


def test_demo_video_shows_the_asked_colour_shape_and_motion(tmp_path, capsys):
    out = tmp_path / "demo.npy"
    assert demo_main(["--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"seen in the video (measured from its pixels): {DEFAULT_PROMPT!r}" in printed
    assert np.load(out).shape == (17, 64, 64, 3)


def test_generate_without_model_uses_the_shipped_model_at_its_size(tmp_path):
    out = tmp_path / "v.npy"
    assert cli_main(["generate", "--prompt", "a blue square moving down", "--output", str(out), "--quiet",
                     "--steps", "2"]) == 0
    assert np.load(out).shape == (17, 64, 64, 3)
