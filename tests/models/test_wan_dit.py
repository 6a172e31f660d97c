"""The Wan transformer against diffusers' WanTransformer3DModel, plus its pure math."""

from __future__ import annotations

import pytest
import torch

from vidloom.loader.weights import load_model
from vidloom.models.layers import apply_rotary
from vidloom.models.wan_dit import WanDiT, WanDiTConfig, rope_phasors

FP32_RTOL = 1e-4
BF16_RTOL = 2e-2  # ours in bf16 vs the reference in bf16 (same kept-fp32 parameters)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    # batch 2 with different timesteps; odd latent grid (3 x 4 x 6 -> 3 x 2 x 3 tokens)
    return torch.randn(2, 4, 3, 4, 6, generator=g), torch.tensor([999, 417]), torch.randn(2, 7, 16, generator=g)


def test_forward_matches_diffusers_fp32(tiny_wan_dir, tiny_wan_pipe, inputs):
    ours = load_model(WanDiT, tiny_wan_dir / "transformer")
    x, t, ctx = inputs
    with torch.no_grad():
        a = ours(x, t, ctx)
        b = tiny_wan_pipe.transformer(x, t, ctx, return_dict=False)[0]
    assert a.shape == b.shape == x.shape
    assert rel(a, b) <= FP32_RTOL


def test_forward_matches_diffusers_bf16(tiny_wan_dir, inputs):
    from diffusers import WanTransformer3DModel

    ours = load_model(WanDiT, tiny_wan_dir / "transformer", dtype=torch.bfloat16)
    ref = WanTransformer3DModel.from_pretrained(str(tiny_wan_dir / "transformer"), dtype=torch.bfloat16)
    # the same parameters stay float32 in both
    ours_fp32 = sorted(n for n, p in ours.named_parameters() if p.dtype == torch.float32)
    ref_fp32 = {n for n, p in ref.named_parameters() if p.dtype == torch.float32}
    assert len(ours_fp32) == len(ref_fp32) > 0
    x, t, ctx = inputs
    with torch.no_grad():
        a = ours(x.bfloat16(), t, ctx.bfloat16())
        b = ref(x.bfloat16(), t, ctx.bfloat16(), return_dict=False)[0]
    assert a.dtype == torch.bfloat16
    assert rel(a.float(), b.float()) <= BF16_RTOL


def test_rotary_is_a_rotation():
    cfg = WanDiTConfig(num_attention_heads=2, attention_head_dim=12, rope_max_seq_len=16)
    freqs = rope_phasors(cfg, (2, 3, 4), "cpu")
    assert freqs.shape == (24, 6) and freqs.dtype == torch.complex64
    x = torch.randn(1, 24, 2, 12)
    y = apply_rotary(x, freqs)
    # rotations keep each pair's norm; token 0 (all positions 0) is unchanged
    assert torch.allclose(x.norm(dim=-1), y.norm(dim=-1), rtol=1e-5)
    assert torch.allclose(x[:, 0], y[:, 0])
    assert not torch.allclose(x[:, 1:], y[:, 1:])


def test_config_rejects_unknown_and_unsupported_keys():
    with pytest.raises(ValueError, match="unknown config key 'num_blocks'"):
        WanDiTConfig.from_dict({"num_blocks": 3})
    with pytest.raises(ValueError, match="image_dim"):
        WanDiTConfig.from_dict({"image_dim": 1280, "added_kv_proj_dim": 5120})
    with pytest.raises(ValueError, match="qk_norm"):
        WanDiTConfig.from_dict({"qk_norm": "rms_norm"})
    cfg = WanDiTConfig.from_dict({"_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2]})
    assert cfg.patch_size == (1, 2, 2) and cfg.dim == 40 * 128


def test_grid_larger_than_rope_table_is_an_error():
    cfg = WanDiTConfig(num_attention_heads=2, attention_head_dim=12, rope_max_seq_len=4)
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        rope_phasors(cfg, (2, 5, 2), "cpu")
