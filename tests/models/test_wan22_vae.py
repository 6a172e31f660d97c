"""The Wan2.2 VAE (``is_residual``, 2x2 patches, 16x spatial) against diffusers' AutoencoderKLWan on a
tiny seeded model of the TI2V-5B layout.

Tolerances, as relative error ||ours - ref|| / ||ref|| over the whole output (measured, torch 2.13 CPU
AVX-512, diffusers 0.42.1, in brackets):
  fp32 encode / decode vs diffusers, any chunking          <= 1e-4  [5e-7-9e-7]
  streaming decode in uneven pushes vs whole decode        <= 1e-5  [1.1e-6: Winograd sizes differ]
  tiled decode / encode vs diffusers tiled                 <= 1e-4  [7e-7 / 5e-7]
  bf16 decode / encode mean vs diffusers fp32   <= 1.1 x diffusers bf16's own error against fp32
                                                [ratios 0.95 / 1.03; errors 1.4e-2 / 1.1e-2]
The tiny model keeps the real layout's features: decoder stages whose shortcut repeats fewer
channels than it has slots (1024 -> 512 in TI2V-5B; 48 -> 24 here), a wider decoder than encoder,
an encoder stage that averages channel pairs, z_dim not a power of two.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch

from vidloom import cpu
from vidloom.models.wan22_vae import patchify, unpatchify

from ..numerics import rel_err
from .test_wan_vae import seeded_pair

torch.set_num_threads(1)

CONFIG = dict(base_dim=8, decoder_base_dim=12, z_dim=6, dim_mult=[1, 2, 4, 2], num_res_blocks=1,
              temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
              patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4, attn_scales=[], dropout=0.0,
              latents_mean=[0.1, -0.2, 0.05, 0.0, 0.3, -0.1], latents_std=[1.5, 0.8, 1.2, 1.0, 0.9, 1.1])
LATENT_FRAMES, LATENT_HW = 3, 8


@functools.cache
def models():
    """(diffusers AutoencoderKLWan, WanVAE with the same weights), fp32, eval."""
    return seeded_pair(CONFIG, 0)


@functools.cache
def inputs(latent_frames: int = LATENT_FRAMES):
    """A video of 1 + 4 (latent_frames - 1) frames at 128 x 128 and latents (1, 6, latent_frames, 8, 8)."""
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode(False):
        video = torch.rand(1, 3, 1 + 4 * (latent_frames - 1), 16 * LATENT_HW, 16 * LATENT_HW, generator=gen) * 2 - 1
        latents = torch.randn(1, 6, latent_frames, LATENT_HW, LATENT_HW, generator=gen)
    return video, latents


@contextlib.contextmanager
def step_elements(vae, value):
    old, vae.step_elements = vae.step_elements, value
    try:
        yield vae
    finally:
        vae.step_elements = old


@contextlib.contextmanager
def diffusers_tiling(ref, tile_px: int, stride_px: int):
    ref.enable_tiling(tile_px, tile_px, stride_px, stride_px)
    try:
        yield ref
    finally:
        ref.disable_tiling()


def test_config_and_keys_equal_diffusers():
    ref, vae = models()
    assert list(vae.state_dict()) == list(ref.state_dict())
    assert list(vae.buffers()) == []
    c = vae.config
    assert (c.spatial_factor, c.network_spatial_factor, c.temporal_factor, c.patch) == (16, 8, 4, 2)
    assert (c.video_channels, c.output_channels) == (3, 3)
    assert c.latent_size(121, 704, 1280) == (31, 44, 80)  # TI2V-5B's 720p


def test_patchify_matches_diffusers_and_inverts():
    from diffusers.models.autoencoders import autoencoder_kl_wan as reference

    x = torch.randn(2, 3, 5, 8, 12)
    assert torch.equal(patchify(x, 2), reference.patchify(x, 2))
    assert torch.equal(unpatchify(patchify(x, 2), 2), x)
    assert torch.equal(unpatchify(reference.patchify(x, 2), 2), reference.unpatchify(reference.patchify(x, 2), 2))


@pytest.mark.parametrize("budget", [None, 1, 10**9], ids=["default", "one-latent-frame", "whole-video"])
def test_encode_matches_diffusers_in_any_chunking(budget):
    # diffusers: the first frame, then 4 at a time; ours as many latent frames per chunk as the
    # budget allows (1 + 4 (n - 1) first, then 4 n): the shortcuts' frame pairs line up either way
    ref, vae = models()
    video, _ = inputs(4)
    with torch.inference_mode(), step_elements(vae, budget):
        dist = ref.encode(video).latent_dist
        mean, logvar = vae.encode(video)
    assert mean.shape == (1, 6, 4, LATENT_HW, LATENT_HW)
    assert rel_err(mean, dist.mean) <= 1e-4
    assert rel_err(logvar, dist.logvar) <= 1e-4


@pytest.mark.parametrize("budget", [None, 1, 10**9], ids=["default", "one-frame", "whole-video"])
def test_decode_matches_diffusers_in_any_step_size(budget):
    ref, vae = models()
    _, z = inputs()
    with torch.inference_mode(), step_elements(vae, budget):
        expected = ref.decode(z).sample
        ours = vae.decode(z)
    assert ours.shape == expected.shape == (1, 3, 9, 128, 128)
    assert rel_err(ours, expected) <= 1e-4


def test_stream_decode_uneven_pushes_equals_whole_decode():
    _, vae = models()
    _, z = inputs(5)
    with torch.inference_mode():
        whole = vae.decode(z)
        stream = vae.stream_decoder()
        parts = [stream.push(z[:, :, a:b]) for a, b in ((0, 2), (2, 2), (2, 3), (3, 5))]
    assert [p.shape[2] for p in parts] == [5, 0, 4, 8]
    assert rel_err(torch.cat(parts, dim=2), whole) <= 1e-5


def test_tiled_decode_matches_diffusers_tiled_decode():
    # 4-latent tiles overlapping by 2: diffusers' tile_sample_min 64 px, stride 32 px (16x)
    ref, vae = models()
    _, z = inputs()
    with torch.inference_mode(), diffusers_tiling(ref, 64, 32):
        expected = ref.decode(z).sample
        ours = vae.decode_tiled(z, tile_latent=4, overlap_latent=2)
    assert ours.shape == expected.shape
    assert rel_err(ours, expected) <= 1e-4


def test_tiled_encode_matches_diffusers_tiled_encode():
    # diffusers tiles the encoder's input in patches: 4-latent tiles = 32 patch pixels (8x)
    ref, vae = models()
    video, _ = inputs()
    with torch.inference_mode(), diffusers_tiling(ref, 32, 16):
        expected = ref.encode(video).latent_dist.mean
        ours, _ = vae.encode_tiled(video, tile_latent=4, overlap_latent=2)
    assert rel_err(ours, expected) <= 1e-4


@pytest.mark.parametrize("plain", [("winograd_fp32",), ("winograd_fp32", "channels_last_vae")],
                         ids=["no-winograd", "no-fast-path"])
def test_cpu_fallbacks_match_diffusers(plain):
    ref, vae = models()
    video, z = inputs()
    with torch.inference_mode():
        expected, expected_mean = ref.decode(z).sample, ref.encode(video).latent_dist.mean
        with cpu.forced(**dict.fromkeys(plain, False)):
            decoded, mean = vae.decode(z), vae.encode_mean(video)
    assert rel_err(decoded, expected) <= 1e-4
    assert rel_err(mean, expected_mean) <= 1e-4


def test_bf16_is_as_accurate_as_diffusers_bf16():
    ref, vae = models()
    video, z = inputs()
    vae16, ref16 = copy.deepcopy(vae).to(torch.bfloat16), copy.deepcopy(ref).to(torch.bfloat16)
    with torch.inference_mode():
        decoded, mean = vae16.decode(z), vae16.encode_mean(video)
        ref16_decoded = ref16.decode(z.to(torch.bfloat16)).sample
        ref16_mean = ref16.encode(video.to(torch.bfloat16)).latent_dist.mean
        ref_decoded, ref_mean = ref.decode(z).sample, ref.encode(video).latent_dist.mean
    assert decoded.dtype == mean.dtype == torch.bfloat16
    assert rel_err(decoded, ref_decoded) <= 1.1 * rel_err(ref16_decoded, ref_decoded)
    assert rel_err(mean, ref_mean) <= 1.1 * rel_err(ref16_mean, ref_mean)


def test_autograd_decode_matches_inference_decode():
    # training decodes with autograd on (the plain path): same frames, gradients reach the weights
    _, vae = models()
    _, z = inputs()
    with torch.inference_mode():
        expected = vae.decode(z, clamp=False)
    out = vae.decode(z, clamp=False)
    out.square().mean().backward()
    assert vae.decoder.up_blocks[0].resnets[0].conv1.weight.grad.abs().sum() > 0
    vae.zero_grad(set_to_none=True)
    assert rel_err(out.detach(), expected) <= 1e-4


def test_wrong_video_channels_are_rejected():
    _, vae = models()
    with pytest.raises(ValueError, match=r"expected \(B, 3, T, H, W\)"):
        vae.encode(torch.zeros(1, 12, 1, 32, 32))
    with pytest.raises(ValueError, match="multiple of 16"):
        vae.encode(torch.zeros(1, 3, 1, 24, 32))
