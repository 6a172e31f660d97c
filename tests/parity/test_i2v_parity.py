"""Wan2.1 image-to-video and first-last-frame-to-video against diffusers' WanImageToVideoPipeline:
the same folder (a tiny random model with a CLIP image encoder), image and initial latents."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vidloom import InvalidRequestError, VideoGenerator

from .test_generate_parity import FP32_RTOL, SIZE, initial_latents, rel_err


def build_i2v_folder(tiny_wan_pipe, folder, flf: bool = False):
    """A tiny Wan2.1 I2V folder (or a first-last-frame one: its transformer positions two images'
    17 tokens), saved by diffusers with the tiny T2V model's text encoder, VAE and scheduler."""
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from vidloom import tiny

    torch.manual_seed(5)
    # in_channels: latents (4) + mask (4, the temporal factor) + VAE-encoded frames (4)
    transformer = WanTransformer3DModel(**dict(tiny.TINY_TRANSFORMER, in_channels=12, image_dim=20,
                                               added_kv_proj_dim=24, pos_embed_seq_len=34 if flf else None))
    image_encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=20, intermediate_size=40, num_hidden_layers=2,
                                                     num_attention_heads=2, image_size=32, patch_size=8))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    parts = {k: getattr(tiny_wan_pipe, k) for k in ("tokenizer", "text_encoder", "vae", "scheduler")}
    WanImageToVideoPipeline(**parts, transformer=transformer, image_encoder=image_encoder,
                            image_processor=processor).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module", params=["i2v", "flf2v"])
def i2v_dir(request, tiny_wan_pipe, tmp_path_factory):
    return build_i2v_folder(tiny_wan_pipe, tmp_path_factory.mktemp(request.param), flf=request.param == "flf2v")


@pytest.fixture(scope="module")
def reference(i2v_dir):
    from diffusers import WanImageToVideoPipeline

    return WanImageToVideoPipeline.from_pretrained(str(i2v_dir), dtype=torch.float32)


@pytest.fixture(scope="module")
def ours(i2v_dir):
    return VideoGenerator.from_pretrained(i2v_dir, dtype="fp32")


def picture(seed: int, w: int = 70, h: int = 50):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def test_image_to_video_matches_diffusers_fp32(ours, reference):
    flf = ours.pipeline.components["transformer"].config.pos_embed_seq_len is not None
    latents = initial_latents(8)
    image, last = picture(1), (picture(2) if flf else None)
    kwargs = dict(num_inference_steps=4, guidance_scale=4.0, **SIZE)
    mine = ours.generate("a red circle moving left", negative_prompt="blurry", image=image, last_image=last,
                         latents=latents, **kwargs)
    ref = reference(image=image, last_image=last, prompt="a red circle moving left", negative_prompt="blurry",
                    latents=latents.clone(), output_type="np", **kwargs).frames[0]
    assert mine.frames.shape == ref.shape == (9, 32, 48, 3)
    assert rel_err(mine.frames, ref) <= FP32_RTOL


def _last(ours):
    """The last frame a first-last-frame model needs (None for plain I2V)."""
    return picture(4) if ours.pipeline.components["transformer"].config.pos_embed_seq_len else None


def test_the_image_matters(ours):
    latents = initial_latents(8)
    kwargs = dict(num_inference_steps=3, guidance_scale=4.0, latents=latents, last_image=_last(ours), **SIZE)
    a = ours.generate("a cat", image=picture(1), **kwargs).frames
    b = ours.generate("a cat", image=picture(3), **kwargs).frames
    assert rel_err(a, b) > 1e-3


@pytest.mark.parametrize("kwargs,field,needle", [
    (dict(), "image", "needs the first frame"),
    (dict(image="/no/such.png"), "image", "no image file"),
    (dict(image=np.zeros((0, 5, 3), np.uint8)), "image", "0 pixels|5x0 pixels"),
])
def test_bad_image_requests_fail_at_submit(ours, kwargs, field, needle):
    with pytest.raises(InvalidRequestError, match=needle) as err:
        ours.submit("a cat", **({"last_image": _last(ours)} if kwargs else {}), **kwargs, **SIZE)
    assert err.value.field == field


def test_last_image_rules(ours):
    with pytest.raises(InvalidRequestError, match="given without image") as err:
        ours.submit("a cat", last_image=picture(2), **SIZE)
    assert err.value.field == "last_image"
    if _last(ours) is not None:
        with pytest.raises(InvalidRequestError, match="needs the last frame too") as err:
            ours.submit("a cat", image=picture(1), **SIZE)
        assert err.value.field == "last_image"


def test_an_image_for_a_text_to_video_model(tiny_generator):
    with pytest.raises(InvalidRequestError, match="this model is text-to-video") as err:
        tiny_generator.submit("a cat", image=picture(1), **SIZE)
    assert err.value.field == "image"


def test_cli_image_flags_and_info(ours, i2v_dir, tmp_path, capsys):
    from vidloom.cli import main

    picture(1).save(tmp_path / "first.png")
    last = _last(ours)
    extra = []
    if last is not None:
        last.save(tmp_path / "last.png")
        extra = ["--last-image", str(tmp_path / "last.png")]
    out = tmp_path / "v.npy"
    assert main(["generate", "--model", str(i2v_dir), "--prompt", "a cat", "--output", str(out), "--quiet",
                 "--image", str(tmp_path / "first.png"), *extra, "--height", "32", "--width", "48",
                 "--num-frames", "9", "--steps", "3", "--seed", "2", "--dtype", "fp32"]) == 0
    api = ours.generate("a cat", image=picture(1), last_image=last, num_inference_steps=3, seed=2, **SIZE)
    assert np.array_equal(np.load(out), api.frames)
    assert main(["info", "--model", str(i2v_dir)]) == 0
    assert "variant: Wan2.1 image-to-video" in capsys.readouterr().out
    # the request's fields are checked before its files are read: a first-last-frame model gets its last frame
    assert main(["generate", "--model", str(i2v_dir), "--prompt", "a cat", "--output", str(out),
                 "--image", str(tmp_path / "missing.png"), *extra, "--height", "32", "--width", "48"]) == 2
    assert "error: image: no image file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def two_expert_i2v_dir(tiny_wan_pipe, tmp_path_factory):
    """Wan2.2 A14B image-to-video in small: two experts, no image encoder (the frames condition only)."""
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel

    from vidloom import tiny

    experts = []
    for seed in (6, 7):
        torch.manual_seed(seed)
        experts.append(WanTransformer3DModel(**dict(tiny.TINY_TRANSFORMER, in_channels=12)))
    parts = {k: getattr(tiny_wan_pipe, k) for k in ("tokenizer", "text_encoder", "vae", "scheduler")}
    folder = tmp_path_factory.mktemp("i2v_a14b")
    WanImageToVideoPipeline(**parts, transformer=experts[0], transformer_2=experts[1], boundary_ratio=0.5,
                            image_encoder=None, image_processor=None).save_pretrained(str(folder))
    return folder


def test_two_expert_i2v_without_clip_matches_diffusers_fp32(two_expert_i2v_dir):
    from diffusers import WanImageToVideoPipeline

    ours = VideoGenerator.from_pretrained(two_expert_i2v_dir, dtype="fp32")
    reference = WanImageToVideoPipeline.from_pretrained(str(two_expert_i2v_dir), dtype=torch.float32)
    assert ours.pipeline.components.get("image_encoder") is None and len(ours.pipeline.denoising.experts) == 2
    latents = initial_latents(9)
    kwargs = dict(num_inference_steps=6, guidance_scale=4.0, guidance_scale_2=2.0, **SIZE)
    mine = ours.generate("a cat", image=picture(1), latents=latents, **kwargs)
    ref = reference(image=picture(1), prompt="a cat", latents=latents.clone(), output_type="np", **kwargs).frames[0]
    assert rel_err(mine.frames, ref) <= FP32_RTOL


def test_bf16_image_to_video_is_close_to_diffusers_fp32(ours, reference, i2v_dir):
    """The transformer, text and image encoders in bf16 (the VAE fp32, vidloom's default) against
    diffusers in fp32: measured 3.5e-3 (I2V) and 4.6e-3 (FLF2V) on these tiny models."""
    flf = ours.pipeline.components["transformer"].config.pos_embed_seq_len is not None
    latents, image, last = initial_latents(8), picture(1), (picture(2) if flf else None)
    kwargs = dict(num_inference_steps=4, guidance_scale=4.0, **SIZE)
    bf16 = VideoGenerator.from_pretrained(i2v_dir, dtype="bf16", vae_dtype="fp32").generate(
        "a red circle moving left", image=image, last_image=last, latents=latents, **kwargs).frames
    ref = reference(image=image, last_image=last, prompt="a red circle moving left", latents=latents.clone(),
                    output_type="np", **kwargs).frames[0]
    assert rel_err(bf16, ref) <= 3e-2
