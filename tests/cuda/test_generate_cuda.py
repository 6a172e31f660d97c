"""Whole generations on CUDA against diffusers' WanPipeline on the same device, same folder and
same initial latents (the CPU versions are in tests/parity/test_generate_parity.py).

Bounds, relative error over the whole output:
  fp32 frames and final latents vs diffusers fp32 on CUDA   <= 1e-4 (TF32 off, see conftest.no_tf32)
  bf16 frames vs diffusers bf16 on CUDA                      <= 5e-2, the CPU bf16 parity bound
      (tests/parity/test_generate_parity.py: bf16 DiT and text encoder against the reference's bf16,
      rounding compounded over the steps); the VAE is fp32 in both, as vidloom's default
  the same seed on CPU and on CUDA (fp32)                    <= 1e-4: the noise is drawn on the CPU
"""

from __future__ import annotations

import pytest
import torch

from .common import DEVICE, DRY_RUN_ON_CPU, FP32_RTOL, device_of, rel_err, requires_cuda

pytestmark = [pytest.mark.cuda, requires_cuda]

BF16_RTOL = 5e-2  # = tests/parity/test_generate_parity.py BF16_RTOL
SIZE = dict(height=32, width=48, num_frames=9)
PROMPT, NEGATIVE = "a red circle moving left", "blurry, static"


def initial_latents(seed=3):
    # (B, C, F, H, W) = (1, 4, (9-1)//4+1, 32/8, 48/8), drawn on the CPU; both libraries move them
    return torch.randn(1, 4, 3, 4, 6, generator=torch.Generator().manual_seed(seed))


def diffusers_pipe(folder, dtype):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(folder), dtype=dtype)
    pipe.vae.to(torch.float32)  # the VAE stays fp32, as vidloom's default vae_dtype
    pipe.to(DEVICE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def gen_fp32(tiny_wan_dir):
    from vidloom import VideoGenerator

    return VideoGenerator.from_pretrained(tiny_wan_dir, device=DEVICE, dtype="fp32")


@pytest.fixture(scope="module")
def ref_fp32(tiny_wan_dir):
    return diffusers_pipe(tiny_wan_dir, torch.float32)


@pytest.mark.parametrize("steps,guidance", [(4, 5.0), (3, 1.0)])
def test_generate_matches_wanpipeline_fp32(gen_fp32, ref_fp32, no_tf32, steps, guidance):
    for name in ("transformer", "text_encoder", "vae"):
        assert device_of(gen_fp32.pipeline.components[name]).type == DEVICE, name
    latents = initial_latents()
    common = dict(num_inference_steps=steps, guidance_scale=guidance, **SIZE)
    ours = gen_fp32.generate(PROMPT, negative_prompt=NEGATIVE, latents=latents, **common)
    ref = ref_fp32(prompt=PROMPT, negative_prompt=NEGATIVE, latents=latents.clone(), output_type="np",
                   **common).frames[0]
    ref_latents = ref_fp32(prompt=PROMPT, negative_prompt=NEGATIVE, latents=latents.clone(), output_type="latent",
                           **common).frames
    assert ours.frames.shape == ref.shape == (9, 32, 48, 3)
    assert ours.latents.device.type == DEVICE and ours.latents.dtype == torch.float32
    err_frames, err_latents = rel_err(ours.frames, ref), rel_err(ours.latents, ref_latents)
    assert err_frames <= FP32_RTOL, f"frames rel err {err_frames:.2e}"
    assert err_latents <= FP32_RTOL, f"latents rel err {err_latents:.2e}"


def test_generate_matches_wanpipeline_bf16(tiny_wan_dir, no_tf32):
    from vidloom import VideoGenerator

    # no dtype given: on a CUDA device with bf16 the DiT and text encoder default to bf16, the VAE to fp32
    # (the CPU dry run asks for them: this CPU's defaults may be fp32)
    explicit = dict(dit_dtype="bf16", text_encoder_dtype="bf16") if DRY_RUN_ON_CPU else {}
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, device=DEVICE, **explicit)
    parts = gen.pipeline.components
    assert parts["transformer"].proj_out.weight.dtype == torch.bfloat16
    assert parts["text_encoder"].dtype == torch.bfloat16
    assert parts["vae"].dtype == torch.float32
    ref = diffusers_pipe(tiny_wan_dir, torch.bfloat16)
    latents = initial_latents(5)
    common = dict(num_inference_steps=4, guidance_scale=5.0, **SIZE)
    ours = gen.generate("a green triangle", latents=latents, **common)
    expected = ref(prompt="a green triangle", latents=latents.clone(), output_type="np", **common).frames[0]
    err = rel_err(ours.frames, expected)
    assert err <= BF16_RTOL, f"bf16 frames rel err {err:.2e}"


def test_seed_gives_the_same_video_on_cpu_and_cuda(tiny_wan_dir, gen_fp32, no_tf32):
    from vidloom import VideoGenerator

    cpu = VideoGenerator.from_pretrained(tiny_wan_dir, device="cpu", dtype="fp32")  # the default is auto: CUDA here
    assert device_of(cpu.pipeline.components["transformer"]).type == "cpu"
    common = dict(seed=11, num_inference_steps=3, guidance_scale=4.0, **SIZE)
    on_cpu, on_cuda = cpu.generate("a blue square", **common), gen_fp32.generate("a blue square", **common)
    err = rel_err(on_cuda.frames, on_cpu.frames)
    assert err <= FP32_RTOL, f"cuda vs cpu rel err {err:.2e}"
