"""WanVAE on CUDA against diffusers' AutoencoderKLWan on CUDA (the CPU versions, with the same
tiny seeded models, are in tests/models/test_wan_vae.py).

Bounds, relative error over the whole output, fp32 with TF32 off:
  decode / encode vs diffusers                   <= 1e-4 (the fp32 parity bound; the two libraries
      cut the time axis into different chunks, so cuDNN may convolve with other algorithms)
  tiled decode vs diffusers' tiled decode        <= 1e-4 (same tiles and blend; each tile as above)
  streaming decode (any chunking) vs whole decode <= 1e-5, as on the CPU (the same per-frame work)
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from ..models import test_wan_vae
from ..models.test_wan_vae import LATENT_FRAMES, LATENT_HW, VARIANTS
from .common import DEVICE, FP32_RTOL, rel_err, requires_cuda

pytestmark = [pytest.mark.cuda, requires_cuda]

STREAM_RTOL = 1e-5


@functools.cache
def models(variant: str):
    """The CPU tests' (diffusers AutoencoderKLWan, WanVAE with the same weights), copied to the device."""
    ref, vae = test_wan_vae.models(variant)
    return copy.deepcopy(ref).to(DEVICE), copy.deepcopy(vae).to(DEVICE)


@functools.cache
def inputs(variant: str):
    """The CPU tests' video and latents for ``variant``, on the device."""
    video, latents = test_wan_vae.inputs(variant)
    return video.to(DEVICE), latents.to(DEVICE)


def our_decode(variant: str) -> torch.Tensor:
    with torch.inference_mode():
        return models(variant)[1].decode(inputs(variant)[1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_matches_diffusers(variant, no_tf32):
    ref, vae = models(variant)
    _, z = inputs(variant)
    with torch.inference_mode():
        expected = ref.decode(z).sample
    ours = our_decode(variant)
    tf, sf = vae.config.temporal_factor, vae.config.spatial_factor
    assert ours.device.type == DEVICE
    assert ours.shape == expected.shape == (1, 3, 1 + tf * (LATENT_FRAMES - 1), LATENT_HW * sf, LATENT_HW * sf)
    err = rel_err(ours, expected)
    assert err <= FP32_RTOL, f"decode rel err {err:.2e}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_encode_matches_diffusers(variant, no_tf32):
    ref, vae = models(variant)
    video, _ = inputs(variant)
    with torch.inference_mode():
        dist = ref.encode(video).latent_dist
        mean, logvar = vae.encode(video)
    assert mean.shape == (1, 4, LATENT_FRAMES, LATENT_HW, LATENT_HW)
    assert rel_err(mean, dist.mean) <= FP32_RTOL
    assert rel_err(logvar, dist.logvar) <= FP32_RTOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiled_decode_matches_diffusers_tiled_decode(variant, no_tf32):
    ref, vae = models(variant)
    _, z = inputs(variant)
    sf, tile, overlap = vae.config.spatial_factor, 4, 2
    # diffusers' tiling parameters equal to tile_latent=4, overlap_latent=2 (as tests/models/test_wan_vae.py)
    ref.enable_tiling(tile * sf, tile * sf, (tile - overlap) * sf, (tile - overlap) * sf)
    try:
        with torch.inference_mode():
            expected = ref.tiled_decode(z).sample
            ours = vae.decode_tiled(z, tile_latent=(tile, tile), overlap_latent=(overlap, overlap))
    finally:
        ref.disable_tiling()
    assert ours.shape == expected.shape
    err = rel_err(ours, expected)
    assert err <= FP32_RTOL, f"tiled decode rel err {err:.2e}"
    assert rel_err(ours, our_decode(variant)) > 1e-3  # tiling really happened


def test_stream_decode_uneven_chunks_equals_whole_decode(no_tf32):
    _, vae = models("8x")
    _, z = inputs("8x")
    tf = vae.config.temporal_factor
    stream = vae.stream_decoder()
    with torch.inference_mode():
        parts = [stream.push(z[:, :, :2]), stream.push(z[:, :, 2:2]), stream.push(z[:, :, 2:])]
    assert [p.shape[2] for p in parts] == [1 + tf, 0, tf]
    err = rel_err(torch.cat(parts, dim=2), our_decode("8x"))
    assert err <= STREAM_RTOL, f"stream rel err {err:.2e}"


def test_stream_decoders_interleave_and_small_steps(no_tf32):
    """Two streams pushed one latent frame at a time, in turn; and a decode in small steps
    (``step_elements``), which slices every decoder stage in time: all equal the whole decode."""
    _, vae = models("8x")
    _, z = inputs("8x")
    other = torch.flip(z, dims=[2])
    a, b = vae.stream_decoder(), vae.stream_decoder()
    out_a, out_b = [], []
    with torch.inference_mode():
        for i in range(LATENT_FRAMES):
            out_a.append(a.push(z[:, :, i : i + 1]))
            out_b.append(b.push(other[:, :, i : i + 1]))
        whole_b = vae.decode(other)
        vae.step_elements = 4096
        try:
            small_steps = vae.decode(z)
        finally:
            vae.step_elements = None
    assert rel_err(torch.cat(out_a, dim=2), our_decode("8x")) <= STREAM_RTOL
    assert rel_err(torch.cat(out_b, dim=2), whole_b) <= STREAM_RTOL
    assert rel_err(small_steps, our_decode("8x")) <= STREAM_RTOL
