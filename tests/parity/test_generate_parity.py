"""Full generation against diffusers' WanPipeline with the same initial latents."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidloom import VideoGenerator

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


@pytest.fixture(scope="module")
def generator_fp32(tiny_wan_dir):
    return VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32")


@pytest.mark.parametrize("steps,guidance", [(4, 5.0), (3, 1.0), (6, 3.5)])
def test_generate_matches_wanpipeline_fp32(generator_fp32, tiny_wan_pipe, steps, guidance):
    latents = initial_latents()
    prompt, negative = "a red circle moving left", "blurry, static"
    ours = generator_fp32.generate(prompt, negative_prompt=negative, num_inference_steps=steps,
                                   guidance_scale=guidance, latents=latents, **SIZE)
    ref = reference_frames(tiny_wan_pipe, prompt, negative, steps, guidance, latents)
    assert ours.frames.shape == ref.shape == (9, 32, 48, 3)
    assert ours.frames.dtype == np.float32
    assert rel_err(ours.frames, ref) <= FP32_RTOL


def test_final_latents_match_fp32(generator_fp32, tiny_wan_pipe):
    latents = initial_latents(7)
    ours = generator_fp32.generate("a blue square", num_inference_steps=5, guidance_scale=4.0, latents=latents,
                                   output_type="latent", **SIZE)
    ref = tiny_wan_pipe(prompt="a blue square", num_inference_steps=5, guidance_scale=4.0, latents=latents.clone(),
                        output_type="latent", **SIZE).frames
    assert ours.frames is None
    assert rel_err(ours.latents, ref) <= FP32_RTOL


def test_unbatched_cfg_equals_batched(tiny_wan_dir):
    latents = initial_latents(11)
    kwargs = dict(num_inference_steps=3, guidance_scale=5.0, latents=latents, output_type="latent", **SIZE)
    batched = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", batch_cfg=True).generate("a cat", **kwargs)
    separate = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", batch_cfg=False).generate("a cat", **kwargs)
    assert rel_err(batched.latents, separate.latents) <= 1e-5


def test_generate_matches_wanpipeline_bf16(tiny_wan_dir):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(tiny_wan_dir), dtype=torch.bfloat16)
    pipe.vae.to(torch.float32)
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dit_dtype="bf16", text_encoder_dtype="bf16", vae_dtype="fp32")
    latents = initial_latents(5)
    ours = gen.generate("a green triangle", num_inference_steps=4, guidance_scale=5.0, latents=latents, **SIZE)
    ref = reference_frames(pipe, "a green triangle", None, 4, 5.0, latents)
    assert rel_err(ours.frames, ref) <= BF16_RTOL


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
