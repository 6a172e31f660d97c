"""Folders written by vidloom's own classes are valid Diffusers folders (the demo model)."""

from __future__ import annotations

import numpy as np
import torch

from vidloom import VideoGenerator
from vidloom.tiny import build_random_wan


def test_vidloom_written_folder_loads_in_diffusers_with_equal_output(tmp_path):
    from diffusers import WanPipeline

    folder = build_random_wan(tmp_path / "m", preset="tiny", seed=1)
    pipe = WanPipeline.from_pretrained(str(folder), dtype=torch.float32)
    gen = VideoGenerator.from_pretrained(folder, dtype="fp32")
    latents = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    kwargs = dict(height=32, width=32, num_frames=5, num_inference_steps=3, guidance_scale=4.0)
    ours = gen.generate("a red circle", latents=latents, **kwargs).frames
    ref = pipe(prompt="a red circle", latents=latents.clone(), output_type="np", **kwargs).frames[0]
    err = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert err <= 1e-4
