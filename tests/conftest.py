"""Shared fixtures: tiny Wan models in Diffusers layout, built with diffusers itself; the device a
test runs on (tests/devices.py)."""

from __future__ import annotations

import pytest
import torch

from .devices import DEVICES

# tiny forwards are fastest single-threaded; pytest-xdist spreads tests over the cores
torch.set_num_threads(1)


def build_diffusers_tiny_wan(folder, seed: int = 0):
    """Save a random tiny WanPipeline (diffusers classes) to ``folder`` and return the pipeline."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from vidloom import tiny

    tokenizer = tiny.build_tokenizer(folder / "_tok")
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**tiny.TINY_TRANSFORMER)
    vae = AutoencoderKLWan(**tiny.TINY_VAE)
    te_config = UMT5Config(vocab_size=len(tokenizer), **tiny.TINY_TEXT_ENCODER)
    text_encoder = UMT5EncoderModel(te_config)
    with torch.no_grad():
        # random UMT5 init gives embeddings of ~0.01; scale them to ~0.5 so that the prompt
        # visibly changes the video and a parity test can tell prompts apart
        text_encoder.encoder.final_layer_norm.weight.mul_(40.0)
    scheduler_cfg = {k: v for k, v in tiny.UNIPC_FLOW_CONFIG.items() if not k.startswith("_")}
    scheduler = UniPCMultistepScheduler(**scheduler_cfg)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                       scheduler=scheduler)
    pipe.save_pretrained(str(folder))
    return pipe


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_wan")
    build_diffusers_tiny_wan(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_wan_pipe(tiny_wan_dir):
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(str(tiny_wan_dir), dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_generator(tiny_wan_dir):
    from vidloom import VideoGenerator

    return VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32")


@pytest.fixture(scope="module", params=DEVICES)
def device(request) -> str:
    """The torch device the test runs on: "cpu", then "cuda" (marked ``cuda``; skipped where torch
    sees no CUDA device). Module-scoped, so that a module's per-device models are built once."""
    return request.param


@pytest.fixture
def no_tf32():
    """fp32 means fp32: TF32 matmuls and cuDNN convolutions off for the test, restored afterwards
    (torch's defaults are matmul TF32 off and cuDNN TF32 *on*, which would put the VAE's and the
    patch embedding's convolutions at TF32 precision, ~1e-3). No effect on the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
