"""The Wan transformer's forward on CUDA against diffusers' WanTransformer3DModel on CUDA
(the CPU versions are in tests/models/test_wan_dit.py).

Two models: the shared tiny folder (head dim 12: on CUDA its bf16 attention falls back to the
math kernel, flash and memory-efficient attention want a head dim divisible by 8) and one with
head dim 64, for which torch picks the fused kernels the real models get (flash without a mask,
memory-efficient with one). The padded-prompt test runs the cross-attention with the score bias
of the collapsed padding keys (``attention.collapse_repeated_tail``), i.e. an attention mask.

Bounds (relative error over the whole output), as on the CPU: fp32 <= 1e-4 (TF32 off);
bf16 <= 2e-2 = tests/models/test_wan_dit.py BF16_RTOL (ours in bf16 vs the reference in bf16,
the same parameters kept fp32 in both).
"""

from __future__ import annotations

import math

import pytest
import torch

from .common import DEVICE, FP32_RTOL, rel_err, requires_cuda

pytestmark = [pytest.mark.cuda, requires_cuda]

BF16_RTOL = 2e-2  # = tests/models/test_wan_dit.py BF16_RTOL
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RTOL = {"fp32": FP32_RTOL, "bf16": BF16_RTOL}


@pytest.fixture(scope="module")
def transformer_dirs(tiny_wan_dir, tmp_path_factory):
    """{"tiny": the shared tiny folder's transformer, "hd64": a tiny transformer with head dim 64}."""
    from diffusers import WanTransformer3DModel

    from vidloom import tiny

    folder = tmp_path_factory.mktemp("wan_dit_hd64")
    torch.manual_seed(1)
    config = {**tiny.TINY_TRANSFORMER, "num_attention_heads": 2, "attention_head_dim": 64, "ffn_dim": 96}
    WanTransformer3DModel(**config).save_pretrained(str(folder))
    return {"tiny": tiny_wan_dir / "transformer", "hd64": folder}


def load_pair(folder, dtype):
    from diffusers import WanTransformer3DModel

    from vidloom.loader.weights import load_model
    from vidloom.models.wan_dit import WanDiT

    ours = load_model(WanDiT, folder, device=DEVICE, dtype=dtype)
    ref = WanTransformer3DModel.from_pretrained(str(folder), dtype=dtype).to(DEVICE).eval()
    return ours, ref


def inputs(dtype):
    g = torch.Generator().manual_seed(0)
    # batch 2 with different timesteps; odd latent grid (3 x 4 x 6 -> 3 x 2 x 3 tokens)
    x, ctx = torch.randn(2, 4, 3, 4, 6, generator=g), torch.randn(2, 7, 16, generator=g)
    return x.to(DEVICE, dtype), torch.tensor([999, 417], device=DEVICE), ctx.to(DEVICE, dtype)


@pytest.mark.parametrize("model", ["tiny", "hd64"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_forward_matches_diffusers(transformer_dirs, no_tf32, model, dtype):
    ours, ref = load_pair(transformer_dirs[model], DTYPES[dtype])
    assert next(ours.parameters()).device.type == DEVICE
    # the same parameters stay float32 in both
    ours_fp32 = {n for n, p in ours.named_parameters() if p.dtype == torch.float32}
    ref_fp32 = {n for n, p in ref.named_parameters() if p.dtype == torch.float32}
    assert len(ours_fp32) == len(ref_fp32)
    x, t, ctx = inputs(DTYPES[dtype])
    with torch.no_grad():
        a = ours(x, t, ctx)
        b = ref(x, t, ctx, return_dict=False)[0]
    assert a.device.type == DEVICE and a.dtype == DTYPES[dtype] and a.shape == b.shape == x.shape
    err = rel_err(a.float(), b.float())
    assert err <= RTOL[dtype], f"{model} {dtype} rel err {err:.2e}"


@pytest.mark.parametrize("model", ["tiny", "hd64"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_padded_prompt_attends_over_collapsed_keys(transformer_dirs, no_tf32, model, dtype):
    """Two prompts of 5 and 2 tokens zero-padded to 40: the padding becomes one key weighed by its
    count (a float32 score bias), same output as the reference attending over all 40."""
    ours, ref = load_pair(transformer_dirs[model], DTYPES[dtype])
    g = torch.Generator().manual_seed(1)
    ctx = torch.zeros(2, 40, 16)
    ctx[0, :5] = torch.randn(5, 16, generator=g)
    ctx[1, :2] = torch.randn(2, 16, generator=g)
    ctx = ctx.to(DEVICE, DTYPES[dtype])
    x, t, _ = inputs(DTYPES[dtype])
    with torch.no_grad():
        kv = ours.encode_context(ctx)
        assert kv[0].k.shape[1] == 6 and kv[0].bias.tolist() == pytest.approx([0.0] * 5 + [math.log(35)])
        a = ours(x, t, context_kv=kv)
        b = ref(x, t, ctx, return_dict=False)[0]
    err = rel_err(a.float(), b.float())
    assert err <= RTOL[dtype], f"{model} {dtype} rel err {err:.2e}"
