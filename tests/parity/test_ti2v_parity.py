"""Wan2.2 TI2V-5B (``expand_timesteps``, the residual 16x VAE) against diffusers on a tiny random
folder of that layout: text-to-video as diffusers' WanPipeline, text+image-to-video from the same
folder as diffusers' WanImageToVideoPipeline over the same components."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vidloom import InvalidRequestError, VideoGenerator

from .test_generate_parity import FP32_RTOL, rel_err

SIZE = dict(height=64, width=96, num_frames=9)  # 16x VAE: 4 x 6 latents, 3 latent frames, 18 tokens
TI2V_VAE = dict(base_dim=8, decoder_base_dim=12, z_dim=6, dim_mult=[1, 2, 4, 2], num_res_blocks=1,
                temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4, attn_scales=[], dropout=0.0,
                latents_mean=[0.1, -0.2, 0.05, 0.0, 0.3, -0.1], latents_std=[1.5, 0.8, 1.2, 1.0, 0.9, 1.1])


def build_ti2v_folder(tiny_wan_pipe, folder, class_name: str = "WanPipeline"):
    """A tiny TI2V-5B-layout folder saved by diffusers (``expand_timesteps: true``, no image encoder),
    with the tiny T2V model's tokenizer, text encoder and scheduler."""
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel

    from vidloom import tiny

    torch.manual_seed(7)
    transformer = WanTransformer3DModel(**dict(tiny.TINY_TRANSFORMER, in_channels=6, out_channels=6))
    vae = AutoencoderKLWan(**TI2V_VAE)
    parts = {k: getattr(tiny_wan_pipe, k) for k in ("tokenizer", "text_encoder", "scheduler")}
    WanPipeline(**parts, transformer=transformer, vae=vae, expand_timesteps=True).save_pretrained(str(folder))
    if class_name != "WanPipeline":
        index = json.loads((folder / "model_index.json").read_text())
        index["_class_name"] = class_name
        (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def initial_latents(seed: int = 3) -> torch.Tensor:
    return torch.randn(1, 6, 3, 4, 6, generator=torch.Generator().manual_seed(seed))


def picture(seed: int, w: int = 70, h: int = 50):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def ti2v_dir(tiny_wan_pipe, tmp_path_factory):
    return build_ti2v_folder(tiny_wan_pipe, tmp_path_factory.mktemp("ti2v"))


@pytest.fixture(scope="module")
def references(ti2v_dir):
    from diffusers import WanImageToVideoPipeline, WanPipeline

    t2v = WanPipeline.from_pretrained(str(ti2v_dir), dtype=torch.float32)
    parts = {k: getattr(t2v, k) for k in ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")}
    return t2v, WanImageToVideoPipeline(**parts, expand_timesteps=True)


@pytest.fixture(scope="module")
def ours(ti2v_dir):
    return VideoGenerator.from_pretrained(ti2v_dir, dtype="fp32")


KWARGS = dict(num_inference_steps=4, guidance_scale=4.0, **SIZE)


def test_text_to_video_matches_diffusers_fp32(ours, references):
    latents = initial_latents()
    mine = ours.generate("a red circle moving left", negative_prompt="blurry", latents=latents, **KWARGS)
    ref = references[0]("a red circle moving left", negative_prompt="blurry", latents=latents.clone(),
                        output_type="np", **KWARGS).frames[0]
    assert mine.frames.shape == ref.shape == (9, 64, 96, 3)
    assert rel_err(mine.frames, ref) <= FP32_RTOL


def test_text_and_image_to_video_matches_diffusers_fp32(ours, references):
    latents, image = initial_latents(), picture(1)
    mine = ours.generate("a red circle moving left", negative_prompt="blurry", image=image, latents=latents, **KWARGS)
    ref = references[1](image=image, prompt="a red circle moving left", negative_prompt="blurry",
                        latents=latents.clone(), output_type="np", **KWARGS).frames[0]
    assert mine.frames.shape == ref.shape
    assert rel_err(mine.frames, ref) <= FP32_RTOL


def test_image_to_video_latents_keep_the_encoded_image(ours):
    latents, image = initial_latents(), picture(2)
    out = ours.generate("a cat", image=image, latents=latents, output_type="latent", **KWARGS).latents
    vae = ours.pipeline.components["vae"]
    from vidloom.io.images import load_image, to_model_input

    with torch.no_grad():
        frame = to_model_input(load_image(image, "image"), SIZE["height"], SIZE["width"])[:, :, None]
        expected = vae.normalize_latents(vae.encode_mean(frame))
    assert torch.allclose(out[:, :, :1], expected, rtol=0, atol=1e-6)  # the first latent frame is the image's
    text_only = ours.generate("a cat", latents=latents, output_type="latent", **KWARGS).latents
    assert not torch.allclose(out[:, :, 1:], text_only[:, :, 1:])  # and the rest follows from it


def test_bf16_image_to_video_is_close_to_fp32(ti2v_dir, ours):
    # bf16 transformer and text encoder (the VAE stays fp32): measured 3.8e-3 on this tiny model
    latents, image = initial_latents(), picture(1)
    fp32 = ours.generate("a red circle moving left", image=image, latents=latents, **KWARGS).frames
    bf16 = VideoGenerator.from_pretrained(ti2v_dir, dtype="bf16").generate(
        "a red circle moving left", image=image, latents=latents, **KWARGS).frames
    assert rel_err(bf16, fp32) <= 3e-2


def test_info_and_limits_say_what_the_folder_takes(ti2v_dir, tiny_wan_pipe, tmp_path):
    limits = VideoGenerator.request_limits(ti2v_dir)
    assert (limits.image, limits.last_image, limits.spatial_factor) == ("optional", False, 32)
    i2v_class = build_ti2v_folder(tiny_wan_pipe, tmp_path / "as-i2v", class_name="WanImageToVideoPipeline")
    assert VideoGenerator.request_limits(i2v_class).image == "required"
    from vidloom.cli import main

    assert main(["info", "--model", str(ti2v_dir)]) == 0


@pytest.mark.parametrize("request_, field, message", [
    (dict(image=None, last_image="x.png"), "last_image", "given without image"),
    (dict(last_image=picture(3)), "last_image", "only the first frame"),
    (dict(height=48), "height", "multiples of 32"),
], ids=["last-without-first", "last-image", "size"])
def test_bad_requests_fail_before_work_and_the_generator_stays_usable(ours, request_, field, message):
    kwargs = dict(KWARGS, image=picture(1), **{k: v for k, v in request_.items() if k in SIZE})
    kwargs.update({k: v for k, v in request_.items() if k not in SIZE})
    with pytest.raises(InvalidRequestError, match=message) as err:
        ours.generate("a cat", **kwargs)
    assert err.value.field == field
    assert ours.generate("a cat", latents=initial_latents(), **dict(KWARGS, num_inference_steps=1)).frames.shape[0] == 9
