"""WanVAE against diffusers' AutoencoderKLWan (the oracle) on tiny seeded models.

Tolerances, as relative error ||ours - ref|| / ||ref|| over the whole output (measured values from
torch 2.13 CPU, diffusers 0.42.1):
  fp32 encode / decode vs diffusers          <= 1e-4   (measured 0.0; 1.1e-7 for the 4x encode, whose
                                                       chunks are 2 frames here and 4 in diffusers)
  streaming decode vs whole decode           <= 1e-5   (measured 0.0: the same per-frame computation)
  tiled decode / encode vs diffusers tiled   <= 1e-6   (measured 0.0: same tiles, same blend weights)
The encode, decode, tiled decode and streaming tests run on every device (tests/devices.py), with
the same bounds on CUDA (TF32 off) except the tiled decode's: <= 1e-4 there, the fp32 parity bound,
as the two libraries cut the time axis into different chunks and cuDNN may convolve each with
another algorithm.
  bf16 decode / encode mean vs diffusers fp32  <= 1.1 x diffusers bf16's own error against fp32
                                             (measured ratios 0.9996-1.0000 decode, 1.00-1.03 encode;
                                             the errors themselves 1.9e-2-2.1e-2 decode, 6e-3-8e-3 encode)
  tiled vs untiled decode (8x, 8x8 latents, 4-latent tiles, overlap 2)  <= 0.5  (measured 0.44)
  tiled vs untiled encode (same tiling)                                  <= 0.35 (measured 0.27)
The tiled-vs-untiled bounds are large by nature, not by sloppiness: on 8x8 latents every pixel lies
within the decoder's receptive field of a tile border (zero padding there), the mid-block attends
over the whole frame, and the weights are random. Tiling itself is pinned exactly by the diffusers
comparison and by "one tile covering everything == untiled".

bf16 is compared through the fp32 reference, not output to output: two bf16 computations that round
at different places differ from each other about as much as each differs from fp32. Ours runs its
3x3x3 convolutions on channels-last frames, for which oneDNN sums in another order than for
diffusers' contiguous ones (measured: with contiguous inputs the outputs are bit-identical); the
two bf16 outputs then differ by 1.1e-3 (tiny model) to 1.4e-2 (wide model) while their errors
against fp32 are equal to 3-4 digits.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect

import pytest
import torch

from vidloom import cpu
from vidloom.models import causal3d
from vidloom.models.wan_vae import WanVAE, WanVAEConfig

from ..devices import device_type
from ..numerics import rel_err

torch.set_num_threads(1)

VARIANTS = {
    # 8x spatial, 4x temporal: the Wan2.1 layout, shrunk
    "8x": dict(dim_mult=[1, 2, 2, 2], temperal_downsample=[False, True, True],
               scale_factor_temporal=4, scale_factor_spatial=8),
    # 4x spatial, 2x temporal: a shorter temperal_downsample list
    "4x": dict(dim_mult=[1, 2, 2], temperal_downsample=[False, True],
               scale_factor_temporal=2, scale_factor_spatial=4),
}
COMMON = dict(base_dim=8, z_dim=4, num_res_blocks=1, attn_scales=[], dropout=0.0,
              latents_mean=[0.1, -0.2, 0.05, 0.0], latents_std=[1.5, 0.8, 1.2, 1.0])
LATENT_FRAMES, LATENT_HW = 3, 8


def seeded_pair(config: dict, seed: int, gammas: bool = True):
    """(diffusers AutoencoderKLWan of ``config`` with seeded random weights, WanVAE with the same
    weights), fp32, eval; ``gammas``: non-trivial norm scales, so a swapped gamma would show.
    Made as normal tensors even when first asked for inside inference_mode (callers cache them)."""
    from diffusers import AutoencoderKLWan

    with torch.inference_mode(False):
        torch.manual_seed(seed)
        ref = AutoencoderKLWan(**config).eval()
        if gammas:
            with torch.no_grad():
                for name, p in ref.named_parameters():
                    if name.endswith("gamma"):
                        p.copy_(1.0 + 0.2 * torch.randn_like(p))
        vae = WanVAE(WanVAEConfig.from_dict(dict(ref.config))).eval()
        vae.load_state_dict(ref.state_dict(), strict=True)
    return ref, vae


@functools.cache
def models(variant: str):
    """(diffusers AutoencoderKLWan, WanVAE with the same weights), fp32, eval."""
    return seeded_pair({**COMMON, **VARIANTS[variant]}, 0)


@functools.cache
def inputs(variant: str):
    """A video of 1 + tf*(LATENT_FRAMES-1) frames and latents (1, 4, LATENT_FRAMES, 8, 8)."""
    config = models(variant)[1].config
    gen = torch.Generator().manual_seed(1)
    frames = 1 + config.temporal_factor * (LATENT_FRAMES - 1)
    side = LATENT_HW * config.spatial_factor
    # cached for every test: normal tensors even when first asked for inside inference_mode, or a
    # later autograd test could not use them
    with torch.inference_mode(False):
        video = torch.rand(1, 3, frames, side, side, generator=gen) * 2 - 1
        latents = torch.randn(1, 4, LATENT_FRAMES, LATENT_HW, LATENT_HW, generator=gen)
    return video, latents


@functools.cache
def models_on(device: str, variant: str):
    """``models(variant)`` on ``device``: the same modules on the CPU, copies elsewhere."""
    ref, vae = models(variant)
    if device_type(device) == "cpu":
        return ref, vae
    return copy.deepcopy(ref).to(device), copy.deepcopy(vae).to(device)


@functools.cache
def inputs_on(device: str, variant: str):
    video, latents = inputs(variant)
    return video.to(device), latents.to(device)


@functools.cache
def our_decode(variant: str, device: str) -> torch.Tensor:
    with torch.inference_mode():
        return models_on(device, variant)[1].decode(inputs_on(device, variant)[1])


@contextlib.contextmanager
def diffusers_tiling(ref, sf: int, tile: int, overlap: int):
    """diffusers' tiling parameters equal to tile_latent=tile, overlap_latent=overlap; switched off
    afterwards, because the shared reference model would otherwise tile every later encode/decode."""
    ref.enable_tiling(tile * sf, tile * sf, (tile - overlap) * sf, (tile - overlap) * sf)
    try:
        yield ref
    finally:
        ref.disable_tiling()


# --------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_keys_equal_diffusers(variant):
    ref, vae = models(variant)
    assert list(vae.state_dict()) == list(ref.state_dict())
    assert list(vae.buffers()) == []
    assert WanVAE.checkpoint_key_map == ()


# ---------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("variant", VARIANTS)
def test_encode_matches_diffusers(variant, device, no_tf32):
    ref, vae = models_on(device, variant)
    video, _ = inputs_on(device, variant)
    with torch.inference_mode():
        dist = ref.encode(video).latent_dist
        mean, logvar = vae.encode(video)
        mean_only = vae.encode_mean(video)
    assert mean.shape == (1, 4, LATENT_FRAMES, LATENT_HW, LATENT_HW)
    assert rel_err(mean, dist.mean) <= 1e-4
    assert rel_err(logvar, dist.logvar) <= 1e-4
    assert torch.equal(mean_only, mean)


@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_matches_diffusers(variant, device, no_tf32):
    reference, vae = models_on(device, variant)
    with torch.inference_mode():
        ref = reference.decode(inputs_on(device, variant)[1]).sample
    ours = our_decode(variant, device)
    tf, sf = vae.config.temporal_factor, vae.config.spatial_factor
    assert device_type(ours.device) == device_type(device)
    assert ours.shape == ref.shape == (1, 3, 1 + tf * (LATENT_FRAMES - 1), LATENT_HW * sf, LATENT_HW * sf)
    err = rel_err(ours, ref)
    assert err <= 1e-4, f"decode rel err {err:.2e}"
    with torch.inference_mode():
        raw = vae.decode(inputs_on(device, variant)[1], clamp=False)
    assert torch.equal(raw.clamp(-1, 1), ours)


def test_batch_of_two_matches_diffusers():
    ref, vae = models("4x")
    video, z = inputs("4x")
    z2, video2 = torch.cat([z, -z]), torch.cat([video, video.flip(-1)])
    with torch.inference_mode():
        assert rel_err(vae.decode(z2), ref.decode(z2).sample) <= 1e-4
        assert rel_err(vae.encode_mean(video2), ref.encode(video2).latent_dist.mean) <= 1e-4


# ------------------------------------------------------------------------------------- streaming


def test_stream_decode_uneven_chunks_equals_whole_decode(device, no_tf32):
    _, vae = models_on(device, "8x")
    _, z = inputs_on(device, "8x")
    tf = vae.config.temporal_factor
    stream = vae.stream_decoder()
    with torch.inference_mode():
        parts = [stream.push(z[:, :, :2]), stream.push(z[:, :, 2:2]), stream.push(z[:, :, 2:])]
    assert [p.shape[2] for p in parts] == [1 + tf, 0, tf]
    err = rel_err(torch.cat(parts, dim=2), our_decode("8x", device))
    assert err <= 1e-5, f"stream rel err {err:.2e}"


def test_stream_decoders_interleave_and_small_steps(device, no_tf32):
    """Two streams pushed one latent frame at a time, in turn; and a decode in small steps
    (``step_elements``), which slices every decoder stage in time: all equal the whole decode."""
    _, vae = models_on(device, "8x")
    _, z = inputs_on(device, "8x")
    other = torch.flip(z, dims=[2])
    a, b = vae.stream_decoder(), vae.stream_decoder()
    out_a, out_b = [], []
    with torch.inference_mode():
        for i in range(LATENT_FRAMES):
            out_a.append(a.push(z[:, :, i : i + 1]))
            out_b.append(b.push(other[:, :, i : i + 1]))
        whole_b = vae.decode(other)
        with vae_options(vae, step_elements=4096):
            small_steps = vae.decode(z)
    assert rel_err(torch.cat(out_a, dim=2), our_decode("8x", device)) <= 1e-5
    assert rel_err(torch.cat(out_b, dim=2), whole_b) <= 1e-5
    assert rel_err(small_steps, our_decode("8x", device)) <= 1e-5


# ---------------------------------------------------------------------------------------- tiling


TILED_DECODE_RTOL = {"cpu": 1e-6, "cuda": 1e-4}  # see the module docstring


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiled_decode_matches_diffusers_tiled_decode(variant, device, no_tf32):
    ref, vae = models_on(device, variant)
    _, z = inputs_on(device, variant)
    sf = vae.config.spatial_factor
    with torch.inference_mode(), diffusers_tiling(ref, sf, tile=4, overlap=2):
        expected = ref.tiled_decode(z).sample
        ours = vae.decode_tiled(z, tile_latent=(4, 4), overlap_latent=(2, 2))
    assert ours.shape == expected.shape
    err = rel_err(ours, expected)
    assert err <= TILED_DECODE_RTOL[device_type(device)], f"tiled decode rel err {err:.2e}"
    assert rel_err(ours, our_decode(variant, device)) > 1e-3  # tiling really happened


def test_tiled_decode_vs_untiled():
    _, vae = models("8x")
    _, z = inputs("8x")
    with torch.inference_mode():
        tiled = vae.decode_tiled(z, tile_latent=4, overlap_latent=2)
        single_tile = vae.decode_tiled(z, tile_latent=LATENT_HW, overlap_latent=2)
    assert torch.equal(single_tile, our_decode("8x", "cpu"))
    assert rel_err(tiled, our_decode("8x", "cpu")) <= 0.5  # see the module docstring for why this is loose


def test_tiled_encode_matches_diffusers_and_bounds_untiled():
    ref, vae = models("8x")
    video, _ = inputs("8x")
    sf = vae.config.spatial_factor
    with torch.inference_mode(), diffusers_tiling(ref, sf, tile=4, overlap=2):
        moments = ref.tiled_encode(video)
        mean, logvar = vae.encode_tiled(video, tile_latent=(4, 4), overlap_latent=(2, 2))
        untiled_mean, _ = vae.encode(video)
    assert rel_err(mean, moments[:, :4]) <= 1e-6
    assert rel_err(logvar, moments[:, 4:].clamp(-30, 20)) <= 1e-6
    assert rel_err(mean, untiled_mean) <= 0.35


def test_tiling_rejects_overlap_not_smaller_than_tile():
    _, vae = models("4x")
    with pytest.raises(ValueError, match="overlap_latent"):
        vae.decode_tiled(inputs("4x")[1], tile_latent=4, overlap_latent=4)


# ------------------------------------------------------------------------------------------ bf16


@pytest.mark.parametrize("build", ["tiny", "wide"])
def test_bf16_is_as_accurate_as_diffusers_bf16(build):
    # "wide" runs the inference path's channels-last convolutions at every stage (see the module
    # docstring); both decode and encode are measured against diffusers in fp32
    ref, vae = models("8x") if build == "tiny" else wide_models()
    video, z = inputs("8x")
    vae16, ref16 = copy.deepcopy(vae).to(torch.bfloat16), copy.deepcopy(ref).to(torch.bfloat16)
    with torch.inference_mode():
        decoded, mean = vae16.decode(z), vae16.encode_mean(video)
        ref16_decoded = ref16.decode(z.to(torch.bfloat16)).sample
        ref16_mean = ref16.encode(video.to(torch.bfloat16)).latent_dist.mean
        ref_decoded, ref_mean = ref.decode(z).sample, ref.encode(video).latent_dist.mean
    assert vae16.dtype == torch.bfloat16 and decoded.dtype == mean.dtype == torch.bfloat16
    assert rel_err(decoded, ref_decoded) <= 1.1 * rel_err(ref16_decoded, ref_decoded)
    assert rel_err(mean, ref_mean) <= 1.1 * rel_err(ref16_mean, ref_mean)


# ---------------------------------------------------------------------------------------- config


def test_config_defaults_equal_diffusers():
    from diffusers import AutoencoderKLWan

    params = inspect.signature(AutoencoderKLWan.__init__).parameters
    defaults = {name: p.default for name, p in params.items() if name != "self"}
    ours = WanVAEConfig().to_dict()
    assert ours == defaults
    WanVAEConfig().validate()


def test_config_scale_factors():
    assert models("8x")[1].config.temporal_factor == 4
    assert models("8x")[1].config.spatial_factor == 8
    assert models("4x")[1].config.temporal_factor == 2
    assert models("4x")[1].config.spatial_factor == 4
    assert models("8x")[1].config.latent_size(81, 480, 832) == (21, 60, 104)


@pytest.mark.parametrize(
    "override, field",
    [
        ({"not_a_key": 1}, "not_a_key"),
        ({"is_residual": "yes"}, "is_residual"),
        ({"patch_size": 0}, "patch_size"),
        ({"patch_size": 2}, "in_channels"),  # 3 channels are no 2x2 patches
        ({"is_residual": True, "dim_mult": [1, 3, 2, 2]}, "dim_mult"),  # 8 x 8 values do not average into 24
        ({"temperal_downsample": [True, True]}, "temperal_downsample"),
        ({"latents_std": [1.0, 1.0]}, "latents_std"),
        ({"base_dim": 0}, "base_dim"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(override, field):
    raw = {**COMMON, **VARIANTS["8x"], "_class_name": "AutoencoderKLWan", **override}
    with pytest.raises(ValueError, match=field):
        WanVAEConfig.from_dict(raw)


def test_video_with_wrong_frame_count_is_rejected():
    _, vae = models("8x")
    with pytest.raises(ValueError, match="num_frames=6"):
        vae.encode(torch.zeros(1, 3, 6, 64, 64))


# -------------------------------------------------------------------------------------- latents


def test_latent_normalisation_matches_the_pipelines():
    _, vae = models("8x")
    z = torch.randn(2, 4, 3, 5, 5, generator=torch.Generator().manual_seed(3))
    mean = torch.tensor(COMMON["latents_mean"]).view(1, 4, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(COMMON["latents_std"]).view(1, 4, 1, 1, 1)
    assert torch.equal(vae.denormalize_latents(z), z / inv_std + mean)  # WanPipeline, before decode
    assert torch.equal(vae.normalize_latents(z), (z - mean) * inv_std)  # Wan I2V, after encode
    assert rel_err(vae.normalize_latents(vae.denormalize_latents(z)), z) <= 1e-6


# -------------------------------------------------------------------- inference fast path (Winograd)
# A wider model (16..32 channels, 64x64 frames) so that the Winograd convolutions run: the models
# above have 8 channels at full resolution, where every convolution runs direct.

WIDE = dict(COMMON, base_dim=16, **VARIANTS["8x"])


@functools.cache
def wide_models():
    return seeded_pair(WIDE, 2, gammas=False)


@contextlib.contextmanager
def vae_options(vae, **options):
    old = {k: getattr(vae, k) for k in options}
    for k, v in options.items():
        setattr(vae, k, v)
    try:
        yield vae
    finally:
        for k, v in old.items():
            setattr(vae, k, v)


@contextlib.contextmanager
def count_winograd_calls():
    from vidloom.models import winograd

    calls, original = [], winograd.conv3x3

    def counting(*args, **kwargs):
        calls.append(kwargs.get("phases", 1))
        return original(*args, **kwargs)

    winograd.conv3x3 = counting
    try:
        yield calls
    finally:
        winograd.conv3x3 = original


@pytest.mark.skipif(not cpu.detect().winograd_fp32, reason="this CPU has no vectorised fp32 kernels: no Winograd")
def test_winograd_decode_matches_diffusers_and_direct():
    # measured: Winograd vs diffusers 2.1e-6, direct vs diffusers 2.5e-7 (other summation order)
    ref, vae = wide_models()
    _, z = inputs("8x")
    with torch.inference_mode():
        expected = ref.decode(z).sample
        with count_winograd_calls() as calls:
            fast = vae.decode(z)
        with vae_options(vae, winograd=False):
            direct = vae.decode(z)
    assert 1 in calls and 2 in calls  # 3x3x3 convolutions and the upsampling convolution
    assert rel_err(fast, expected) <= 1e-4
    assert rel_err(direct, expected) <= 1e-5


@pytest.mark.parametrize("plain", [("winograd_fp32",), ("winograd_fp32", "channels_last_vae")],
                         ids=["no-winograd", "no-fast-path"])
def test_cpu_fallbacks_match_diffusers(plain):
    """With a CPU fast path forced off (as on a CPU that lacks it), decode and encode still equal
    diffusers: Winograd off runs the direct convolutions, channels-last off the plain path."""
    ref, vae = wide_models()
    video, z = inputs("8x")
    with torch.inference_mode():
        expected, expected_mean = ref.decode(z).sample, ref.encode(video).latent_dist.mean
        with cpu.forced(**dict.fromkeys(plain, False)), count_winograd_calls() as calls:
            decoded, mean = vae.decode(z), vae.encode_mean(video)
            cache = vae._new_cache()
    assert calls == [] and not cache.winograd
    assert cache.inference == ("channels_last_vae" not in plain)
    assert rel_err(decoded, expected) <= 1e-5
    assert rel_err(mean, expected_mean) <= 1e-5


def test_winograd_decode_does_not_depend_on_step_size_or_chunks():
    # measured 0.0-3e-7: slices change matmul sizes, not what each output frame sums
    _, vae = wide_models()
    _, z = inputs("8x")
    with torch.inference_mode():
        whole = vae.decode(z)
        with vae_options(vae, step_elements=1):  # one frame per call at every stage
            sliced = vae.decode(z)
        stream = vae.stream_decoder()
        parts = torch.cat([stream.push(z[:, :, :1]), stream.push(z[:, :, 1:])], dim=2)
    assert rel_err(sliced, whole) <= 1e-5
    assert rel_err(parts, whole) <= 1e-5


def test_default_step_budget_follows_dtype():
    """None picks the default for the activations' dtype (larger steps for fp32's Winograd
    matmuls); a value the user sets wins."""
    _, vae = wide_models()
    assert vae.step_elements is None
    assert vae.step_budget(torch.float32) == causal3d.STEP_ELEMENTS
    assert vae.step_budget(torch.bfloat16) == causal3d.HALF_PRECISION_STEP_ELEMENTS < causal3d.STEP_ELEMENTS
    with vae_options(vae, step_elements=123):
        assert vae.step_budget(torch.bfloat16) == 123


def test_winograd_encode_matches_diffusers_in_any_chunking():
    ref, vae = wide_models()
    video, _ = inputs("8x")
    with torch.inference_mode():
        expected = ref.encode(video).latent_dist.mean
        with count_winograd_calls() as calls:
            whole = vae.encode_mean(video)  # the whole clip in one chunk
        with vae_options(vae, step_elements=1):  # diffusers' chunks: 1 frame, then 4 at a time
            chunked = vae.encode_mean(video)
    assert calls
    assert rel_err(whole, expected) <= 1e-4
    assert rel_err(chunked, expected) <= 1e-4
    assert rel_err(whole, chunked) <= 1e-5


def test_winograd_tiled_decode_matches_diffusers_tiled_decode():
    ref, vae = wide_models()
    _, z = inputs("8x")
    with torch.inference_mode(), diffusers_tiling(ref, 8, tile=6, overlap=2):
        expected = ref.tiled_decode(z).sample
        ours = vae.decode_tiled(z, tile_latent=6, overlap_latent=2)
    assert rel_err(ours, expected) <= 1e-4


def test_winograd_stream_reuses_its_buffers_and_matches_whole_decode():
    # inference overwrites each 3x3x3 layer's two context frames in place and keeps the residual
    # blocks' hidden activation in the workspace: a fixed set of large buffers, so a long decode's
    # freed memory is not left scattered over the heap. Same frames (measured 0.0 against whole)
    from vidloom.models.causal3d import CausalConv3d

    ref, vae = wide_models()
    _, z = inputs("8x")
    with torch.inference_mode():
        expected = ref.decode(z).sample
        whole = vae.decode(z)
        stream = vae.stream_decoder()
        pieces = [stream.push(z[:, :, :1])]
        history = stream._cache._history
        buffers = {layer: t.data_ptr() for layer, t in history.items()
                   if isinstance(layer, CausalConv3d) and layer.kernel_size == (3, 3, 3)}
        pieces += [stream.push(z[:, :, i : i + 1]) for i in range(1, z.shape[2])]
        streamed = torch.cat(pieces, dim=2)
    assert buffers and {layer: history[layer].data_ptr() for layer in buffers} == buffers
    assert any(role == "hidden" for role, _, _ in stream._cache.workspace._buffers)
    assert [p.shape[2] for p in pieces] == [1] + [4] * (z.shape[2] - 1)
    assert rel_err(streamed, whole) <= 1e-5
    assert rel_err(streamed, expected) <= 1e-4


def test_tiled_decode_tiles_share_one_workspace(monkeypatch):
    from vidloom.models.wan_vae import WanStreamDecoder

    ref, vae = wide_models()
    _, z = inputs("8x")
    workspaces = []
    push = WanStreamDecoder._push

    def record(self, latents, patches):
        workspaces.append(self._cache.workspace)
        return push(self, latents, patches)

    monkeypatch.setattr(WanStreamDecoder, "_push", record)
    with torch.inference_mode(), diffusers_tiling(ref, 8, tile=6, overlap=2):
        expected = ref.tiled_decode(z).sample
        ours = vae.decode_tiled(z, tile_latent=6, overlap_latent=2)
    assert len(workspaces) == 4 and all(ws is workspaces[0] for ws in workspaces)
    assert rel_err(ours, expected) <= 1e-4


def test_autograd_decode_takes_the_differentiable_path():
    # training decodes with autograd on: no in-place buffers, gradients reach the weights
    _, vae = wide_models()
    _, z = inputs("8x")
    with torch.inference_mode():
        expected = vae.decode(z, clamp=False)
    out = vae.decode(z, clamp=False)
    assert out.requires_grad
    out.square().mean().backward()
    grad = vae.decoder.up_blocks[-1].resnets[0].conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    vae.zero_grad(set_to_none=True)
    assert rel_err(out.detach(), expected) <= 1e-4


def test_decode_frees_its_buffers_without_the_garbage_collector():
    import gc
    import weakref

    _, vae = wide_models()
    _, z = inputs("8x")
    caches = []
    original = causal3d.CausalCache.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        caches.append(weakref.ref(self))

    gc.disable()
    causal3d.CausalCache.__init__ = record
    try:
        with torch.inference_mode():
            vae.decode_tiled(z, tile_latent=6, overlap_latent=2)
            vae.encode_mean(inputs("8x")[0])
    finally:
        causal3d.CausalCache.__init__ = original
        gc.enable()
    assert len(caches) == 5  # four tiles and one encode
    assert all(ref() is None for ref in caches)

