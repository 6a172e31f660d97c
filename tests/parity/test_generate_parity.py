"""Full generation against diffusers' WanPipeline with the same initial latents, on the same device.

Bounds, relative error over the whole output, on every device (tests/devices.py; TF32 off on CUDA):
  fp32 frames and final latents vs diffusers fp32   <= 1e-4
  bf16 frames vs diffusers bf16                     <= 5e-2: the bf16 DiT and text encoder against
      the reference's, rounding compounded over the steps; the VAE is fp32 in both
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidloom import VideoGenerator

from ..devices import device_type
from ..numerics import rel_err

FP32_RTOL = 1e-4  # relative error on the whole output, fp32
BF16_RTOL = 5e-2  # bf16 DiT/text encoder vs the reference's bf16, compounded over steps

SIZE = dict(height=32, width=48, num_frames=9)


def initial_latents(seed=3):
    # (B, C, F, H, W) = (1, 4, (9-1)//4+1, 32/8, 48/8)
    return torch.randn(1, 4, 3, 4, 6, generator=torch.Generator().manual_seed(seed))


def reference_frames(pipe, prompt, negative, steps, guidance, latents, output_type="np", **extra):
    out = pipe(prompt=prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
               latents=latents.clone(), output_type=output_type, **SIZE, **extra)
    return out.frames[0] if output_type == "np" else out.frames


def diffusers_pipe(folder, dtype, device):
    """diffusers' WanPipeline from ``folder`` on ``device``, its VAE fp32 as vidloom's default vae_dtype."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(folder), dtype=dtype)
    pipe.vae.to(torch.float32)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def generator_fp32(tiny_wan_dir, device):
    return VideoGenerator.from_pretrained(tiny_wan_dir, device=device, dtype="fp32")


@pytest.fixture(scope="module")
def reference_fp32(tiny_wan_dir, tiny_wan_pipe, device):
    """The session's CPU reference pipeline on the CPU; a copy of its own elsewhere."""
    return tiny_wan_pipe if device_type(device) == "cpu" else diffusers_pipe(tiny_wan_dir, torch.float32, device)


@pytest.mark.parametrize("steps,guidance", [(4, 5.0), (3, 1.0), (6, 3.5)])
def test_generate_matches_wanpipeline_fp32(generator_fp32, reference_fp32, device, no_tf32, steps, guidance):
    for name in ("transformer", "text_encoder", "vae"):
        component = generator_fp32.pipeline.components[name]
        assert device_type(next(component.parameters()).device) == device_type(device), name
    latents = initial_latents()
    prompt, negative = "a red circle moving left", "blurry, static"
    ours = generator_fp32.generate(prompt, negative_prompt=negative, num_inference_steps=steps,
                                   guidance_scale=guidance, latents=latents, **SIZE)
    ref = reference_frames(reference_fp32, prompt, negative, steps, guidance, latents)
    assert ours.frames.shape == ref.shape == (9, 32, 48, 3)
    assert ours.frames.dtype == np.float32
    err = rel_err(ours.frames, ref)
    assert err <= FP32_RTOL, f"frames rel err {err:.2e}"


def test_final_latents_match_fp32(generator_fp32, reference_fp32, device, no_tf32):
    latents = initial_latents(7)
    ours = generator_fp32.generate("a blue square", num_inference_steps=5, guidance_scale=4.0, latents=latents,
                                   output_type="latent", **SIZE)
    ref = reference_fp32(prompt="a blue square", num_inference_steps=5, guidance_scale=4.0, latents=latents.clone(),
                         output_type="latent", **SIZE).frames
    assert ours.frames is None
    assert device_type(ours.latents.device) == device_type(device) and ours.latents.dtype == torch.float32
    err = rel_err(ours.latents, ref)
    assert err <= FP32_RTOL, f"latents rel err {err:.2e}"


def test_unbatched_cfg_equals_batched(tiny_wan_dir):
    latents = initial_latents(11)
    kwargs = dict(num_inference_steps=3, guidance_scale=5.0, latents=latents, output_type="latent", **SIZE)
    batched = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", batch_cfg=True).generate("a cat", **kwargs)
    separate = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", batch_cfg=False).generate("a cat", **kwargs)
    assert rel_err(batched.latents, separate.latents) <= 1e-5


def test_generate_matches_wanpipeline_bf16(tiny_wan_dir, device, no_tf32):
    # on CUDA no dtype is given: with bf16 there the DiT and text encoder default to bf16, the VAE to
    # fp32; the CPU's defaults follow its features, so there they are asked for
    dtypes = {} if device == "cuda" else dict(dit_dtype="bf16", text_encoder_dtype="bf16", vae_dtype="fp32")
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, device=device, **dtypes)
    parts = gen.pipeline.components
    assert parts["transformer"].proj_out.weight.dtype == torch.bfloat16
    assert parts["text_encoder"].dtype == torch.bfloat16
    assert parts["vae"].dtype == torch.float32
    pipe = diffusers_pipe(tiny_wan_dir, torch.bfloat16, device)
    latents = initial_latents(5)
    ours = gen.generate("a green triangle", num_inference_steps=4, guidance_scale=5.0, latents=latents, **SIZE)
    ref = reference_frames(pipe, "a green triangle", None, 4, 5.0, latents)
    err = rel_err(ours.frames, ref)
    assert err <= BF16_RTOL, f"bf16 frames rel err {err:.2e}"


def test_tiled_decode_matches_reference_tiling(tiny_wan_dir, tiny_wan_pipe):
    # 48x64 frames, 32-pixel tiles with 16-pixel overlap: both axes are split into blended tiles
    size = dict(height=48, width=64, num_frames=5)
    latents = torch.randn(1, 4, 2, 6, 8, generator=torch.Generator().manual_seed(2))
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", vae_tiling=True, vae_tile_size=32,
                                         vae_tile_overlap=16)
    ours = gen.generate("a cat", num_inference_steps=2, latents=latents, **size)
    tiny_wan_pipe.vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32,
                                    tile_sample_stride_height=16, tile_sample_stride_width=16)
    try:
        ref = tiny_wan_pipe(prompt="a cat", num_inference_steps=2, latents=latents.clone(), output_type="np",
                            **size).frames[0]
    finally:
        tiny_wan_pipe.vae.disable_tiling()
    assert rel_err(ours.frames, ref) <= FP32_RTOL
    untiled = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32").generate(
        "a cat", num_inference_steps=2, latents=latents, **size)
    assert rel_err(ours.frames, untiled.frames) > 1e-3  # tiling really happened
