"""The Wan transformer against diffusers' WanTransformer3DModel, plus its pure math.

The forward is compared on every device (tests/devices.py), with two models: the shared tiny
folder (head dim 12: on CUDA its bf16 attention falls back to the math kernel, as flash and
memory-efficient attention want a head dim divisible by 8) and one with head dim 64, for which
CUDA picks the fused kernels the real models get (flash without a mask, memory-efficient with
one: the padded-prompt test's score bias of the collapsed padding keys is such a mask).

Bounds, relative error over the whole output: fp32 <= 1e-4 (TF32 off on CUDA); bf16 <= 2e-2,
ours in bf16 against the reference in bf16 with the same parameters kept fp32 in both.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from vidloom import cpu
from vidloom.loader.weights import load_model
from vidloom.models.attention import attention, collapse_repeated_tail
from vidloom.models.layers import apply_rotary
from vidloom.models.wan_dit import WanDiT, WanDiTConfig, rope_phasors

from ..devices import device_type

FP32_RTOL = 1e-4
BF16_RTOL = 2e-2  # ours in bf16 vs the reference in bf16 (same kept-fp32 parameters)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RTOL = {"fp32": FP32_RTOL, "bf16": BF16_RTOL}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    # batch 2 with different timesteps; odd latent grid (3 x 4 x 6 -> 3 x 2 x 3 tokens)
    return torch.randn(2, 4, 3, 4, 6, generator=g), torch.tensor([999, 417]), torch.randn(2, 7, 16, generator=g)


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


def load_pair(folder, device, dtype):
    """(ours, diffusers' reference) from ``folder`` on ``device`` in ``dtype``; the same parameters
    stay float32 in both."""
    from diffusers import WanTransformer3DModel

    ours = load_model(WanDiT, folder, device=device, dtype=dtype)
    ref = WanTransformer3DModel.from_pretrained(str(folder), dtype=dtype).to(device).eval()
    assert device_type(next(ours.parameters()).device) == device_type(device)
    ours_fp32 = {n for n, p in ours.named_parameters() if p.dtype == torch.float32}
    ref_fp32 = {n for n, p in ref.named_parameters() if p.dtype == torch.float32}
    assert len(ours_fp32) == len(ref_fp32) > 0
    return ours, ref


def check_forward(ours, ref, inputs, device, dtype: str, paths=None):
    """Both on ``inputs`` (moved to ``device``), within ``paths`` (a context: forced CPU paths)."""
    x, t, ctx = inputs
    x, t, ctx = x.to(device, DTYPES[dtype]), t.to(device), ctx.to(device, DTYPES[dtype])
    with torch.no_grad(), paths or contextlib.nullcontext():
        a = ours(x, t, ctx)
        b = ref(x, t, ctx, return_dict=False)[0]
    assert device_type(a.device) == device_type(device) and a.dtype == DTYPES[dtype]
    assert a.shape == b.shape == x.shape
    err = rel(a.float(), b.float())
    assert err <= RTOL[dtype], f"{dtype} rel err {err:.2e}"


@pytest.mark.parametrize("model", ["tiny", "hd64"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_forward_matches_diffusers(transformer_dirs, inputs, device, no_tf32, model, dtype):
    """On the CPU with this machine's fast paths (the fused GELU where oneDNN runs bf16); on CUDA
    with the attention kernels torch picks for the head dim."""
    ours, ref = load_pair(transformer_dirs[model], device, DTYPES[dtype])
    check_forward(ours, ref, inputs, device, dtype)


def test_forward_matches_diffusers_bf16_with_the_plain_cpu_ops(transformer_dirs, inputs):
    """bf16 with the CPU's fast paths forced off, so that the plain ops are checked on every machine."""
    ours, ref = load_pair(transformer_dirs["tiny"], "cpu", torch.bfloat16)
    check_forward(ours, ref, inputs, "cpu", "bf16", paths=cpu.forced(fused_linear_gelu=False))


@pytest.fixture(scope="module")
def padded_context():
    """Two prompts of 5 and 2 tokens zero-padded to 40, as the text stage hands them over."""
    g = torch.Generator().manual_seed(1)
    ctx = torch.zeros(2, 40, 16)
    ctx[0, :5] = torch.randn(5, 16, generator=g)
    ctx[1, :2] = torch.randn(2, 16, generator=g)
    return ctx


@pytest.mark.parametrize("model", ["tiny", "hd64"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_padded_prompt_attends_over_collapsed_keys(transformer_dirs, inputs, padded_context, device, no_tf32,
                                                   model, dtype):
    """The padding becomes one key weighed by its count (40 keys -> 6; a float32 score bias), same
    output as the reference attending over all 40."""
    ours, ref = load_pair(transformer_dirs[model], device, DTYPES[dtype])
    x, t, _ = inputs
    x, t, ctx = x.to(device, DTYPES[dtype]), t.to(device), padded_context.to(device, DTYPES[dtype])
    with torch.no_grad():
        kv = ours.encode_context(ctx)
        assert kv[0].k.shape[1] == 6 and kv[0].bias.tolist() == pytest.approx([0.0] * 5 + [math.log(35)])
        a = ours(x, t, context_kv=kv)
        b = ref(x, t, ctx, return_dict=False)[0]
    err = rel(a.float(), b.float())
    assert err <= RTOL[dtype], f"{model} {dtype} rel err {err:.2e}"


def test_collapse_repeated_tail_keeps_distinct_tokens():
    ctx = torch.randn(2, 9, 4)
    assert collapse_repeated_tail(ctx) == (ctx, None)  # nothing repeats
    ctx[0, 6:] = ctx[0, 8]
    ctx[1, 4:] = ctx[1, 8]
    short, bias = collapse_repeated_tail(ctx)  # the shorter repeated run (row 0: 3) decides
    assert torch.equal(short, ctx[:, :7]) and bias.tolist() == pytest.approx([0.0] * 6 + [math.log(3)])
    q, k, v = torch.randn(2, 5, 2, 2), torch.randn(2, 9, 2, 2), torch.randn(2, 9, 2, 2)
    k[0, 6:], v[0, 6:], k[1, 4:], v[1, 4:] = k[0, 8], v[0, 8], k[1, 8], v[1, 8]
    full = attention(q, k, v, kind="cross")
    assert rel(attention(q, k[:, :7], v[:, :7], kind="cross", bias=bias), full) <= 1e-6
    assert rel(attention(q, k[:, :7], v[:, :7], kind="cross"), full) > 1e-2  # without the bias it is another attention


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
    with pytest.raises(ValueError, match="image_dim/added_kv_proj_dim: an image-conditioned transformer needs both"):
        WanDiTConfig.from_dict({"image_dim": 1280})
    with pytest.raises(ValueError, match="added_kv_proj_dim: must equal the width 5120"):
        WanDiTConfig.from_dict({"image_dim": 1280, "added_kv_proj_dim": 1280})
    with pytest.raises(ValueError, match="pos_embed_seq_len: needs image_dim"):
        WanDiTConfig.from_dict({"pos_embed_seq_len": 514})
    assert WanDiTConfig.from_dict({"image_dim": 1280, "added_kv_proj_dim": 5120, "pos_embed_seq_len": 514}).image_dim
    with pytest.raises(ValueError, match="qk_norm"):
        WanDiTConfig.from_dict({"qk_norm": "rms_norm"})
    cfg = WanDiTConfig.from_dict({"_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2]})
    assert cfg.patch_size == (1, 2, 2) and cfg.dim == 40 * 128


def test_grid_larger_than_rope_table_is_an_error():
    cfg = WanDiTConfig(num_attention_heads=2, attention_head_dim=12, rope_max_seq_len=4)
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        rope_phasors(cfg, (2, 5, 2), "cpu")


# ------------------------------------------------------------------------- image-conditioned (I2V)
# The Wan2.1 I2V transformer: a second cross-attention to the image encoder's tokens (add_k_proj,
# add_v_proj, norm_added_k), their embedder (and, for first-last-frame models, learned positions
# of the two images' tokens). diffusers splits its context as [image tokens; 512 text tokens].


@pytest.fixture(scope="module", params=[None, 8], ids=["i2v", "flf2v"])
def image_dit_dir(request, tmp_path_factory):
    from diffusers import WanTransformer3DModel

    from vidloom import tiny

    torch.manual_seed(3)
    config = dict(tiny.TINY_TRANSFORMER, in_channels=9, image_dim=20, added_kv_proj_dim=24,
                  pos_embed_seq_len=request.param)
    ref = WanTransformer3DModel(**config)
    with torch.no_grad():  # non-zero positions, so a dropped pos_embed would show
        for name, p in ref.named_parameters():
            if name.endswith("pos_embed"):
                p.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("image_dit")
    ref.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("dtype,bound", [(torch.float32, FP32_RTOL), (torch.bfloat16, BF16_RTOL)],
                         ids=["fp32", "bf16"])
def test_image_conditioned_forward_matches_diffusers(image_dit_dir, dtype, bound):
    from diffusers import WanTransformer3DModel

    ours = load_model(WanDiT, image_dit_dir, dtype=dtype)
    ref = WanTransformer3DModel.from_pretrained(str(image_dit_dir), dtype=dtype)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 9, 3, 4, 6, generator=g)
    t = torch.tensor([999, 417])
    text = torch.zeros(2, 512, 16)
    text[:, :7] = torch.randn(2, 7, 16, generator=g)  # a 7-token prompt padded to 512, as the text stage gives
    tokens = 4  # per image; first-last-frame models take two images' tokens
    image = torch.randn(2 * (2 if ours.config.pos_embed_seq_len else 1), tokens, 20, generator=g)
    if ours.config.pos_embed_seq_len:
        assert ours.config.pos_embed_seq_len == 2 * tokens
    with torch.no_grad():
        a = ours(x.to(dtype), t, text.to(dtype), image_embeds=image.to(dtype))
        b = ref(x.to(dtype), t, text.to(dtype), encoder_hidden_states_image=image.to(dtype), return_dict=False)[0]
        without = ours(x.to(dtype), t, text.to(dtype), image_embeds=torch.zeros_like(image).to(dtype))
    assert rel(a.float(), b.float()) <= bound
    assert rel(without.float(), a.float()) > 0.05  # the image matters (measured ~0.19)
    assert sorted(n for n, p in ours.named_parameters() if p.dtype == torch.float32) == \
        sorted(n.replace("ff.net.0.proj", "ff.linear_1").replace("ff.net.2", "ff.linear_2")
               .replace("to_out.0", "to_out").replace("ffn.net.0.proj", "ffn.fc_in.proj").replace("ffn.net.2", "ffn.fc_out")
               for n, p in ref.named_parameters() if p.dtype == torch.float32)


def test_image_embeds_for_a_text_only_transformer(tiny_wan_dir):
    ours = load_model(WanDiT, tiny_wan_dir / "transformer")
    with pytest.raises(ValueError, match="image_embeds: this transformer takes no image"):
        ours.encode_context(torch.zeros(1, 4, 16), image_embeds=torch.zeros(1, 2, 20))


def ti2v_timesteps(t: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Per-token timesteps as diffusers' TI2V pipelines build them: the first latent frame's tokens
    at 0 (the given image), every other token at the row's t. (B,) -> (B, f*h*w)."""
    f, h, w = grid
    mask = torch.ones(f, h, w)
    mask[0] = 0
    return (mask.flatten()[None] * t[:, None].float())


@pytest.mark.parametrize("kind", ["first-frame", "per-token"])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, FP32_RTOL), (torch.bfloat16, BF16_RTOL)], ids=["fp32", "bf16"])
def test_per_token_timesteps_match_diffusers(tiny_wan_dir, inputs, kind, dtype, bound):
    """Timesteps (B, tokens) as Wan2.2 TI2V gives them: two runs (first frame at 0), embedded once
    per run; or a different one for every token (embedded per token). Both equal diffusers."""
    from diffusers import WanTransformer3DModel

    ours = load_model(WanDiT, tiny_wan_dir / "transformer", dtype=dtype)
    ref = WanTransformer3DModel.from_pretrained(str(tiny_wan_dir / "transformer"), dtype=dtype)
    x, t, ctx = inputs
    grid = (3, 2, 3)
    if kind == "first-frame":
        timestep = ti2v_timesteps(t, grid)
    else:
        timestep = torch.rand(2, math.prod(grid), generator=torch.Generator().manual_seed(3)) * 1000
    with torch.no_grad():
        a = ours(x.to(dtype), timestep, ctx.to(dtype))
        b = ref(x.to(dtype), timestep, ctx.to(dtype), return_dict=False)[0]
    assert rel(a.float(), b.float()) <= bound


def test_per_token_timesteps_all_equal_give_the_scalar_result(tiny_wan_dir, inputs):
    ours = load_model(WanDiT, tiny_wan_dir / "transformer")
    x, t, ctx = inputs
    with torch.no_grad():
        scalar = ours(x, t, ctx)
        per_token = ours(x, t[:, None].expand(2, 18), ctx)
        first_frame = ours(x, ti2v_timesteps(t, (3, 2, 3)), ctx)
    assert torch.equal(scalar, per_token)
    assert not torch.allclose(scalar, first_frame)  # the first frame's tokens did see t = 0


def test_timestep_of_the_wrong_length_is_an_error(tiny_wan_dir, inputs):
    ours = load_model(WanDiT, tiny_wan_dir / "transformer")
    x, t, ctx = inputs
    with pytest.raises(ValueError, match=r"timestep: expected \(2,\) or \(2, 18\)"):
        ours(x, torch.zeros(2, 17), ctx)
