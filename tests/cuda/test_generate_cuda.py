"""The same seed on the CPU and on CUDA gives the same video (the parity of CUDA generations with
diffusers on the same device is in tests/parity/test_generate_parity.py, on every device).

Bound: fp32 relative error over the whole output <= 1e-4 (TF32 off): the noise is drawn on the CPU.
"""

from __future__ import annotations

import pytest

from .common import DEVICE, FP32_RTOL, device_of, rel_err, requires_cuda

pytestmark = [pytest.mark.cuda, requires_cuda]

SIZE = dict(height=32, width=48, num_frames=9)


def test_seed_gives_the_same_video_on_cpu_and_cuda(tiny_wan_dir, no_tf32):
    from vidloom import VideoGenerator

    cpu = VideoGenerator.from_pretrained(tiny_wan_dir, device="cpu", dtype="fp32")  # the default is auto: CUDA here
    cuda = VideoGenerator.from_pretrained(tiny_wan_dir, device=DEVICE, dtype="fp32")
    assert device_of(cpu.pipeline.components["transformer"]).type == "cpu"
    assert device_of(cuda.pipeline.components["transformer"]).type == DEVICE
    common = dict(seed=11, num_inference_steps=3, guidance_scale=4.0, **SIZE)
    on_cpu, on_cuda = cpu.generate("a blue square", **common), cuda.generate("a blue square", **common)
    err = rel_err(on_cuda.frames, on_cpu.frames)
    assert err <= FP32_RTOL, f"cuda vs cpu rel err {err:.2e}"
