"""Quantized weight storage (int8, fp8 e4m3; per-channel scales) of the transformer blocks: every
Linear of the blocks quantized and nothing else, about half the bf16 bytes, the video close to the
unquantized one; merged LoRA adapters are quantized with the weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vidloom import EngineConfig, VideoGenerator
from vidloom.cli import main as cli_main
from vidloom.loader.weights import load_model
from vidloom.models.wan_dit import WanDiT
from vidloom.quant import QuantizedLinear, quantize_blocks

from .parity.test_lora_parity import pairs, write_diffusers  # noqa: F401 - pairs: a fixture

RUN = dict(prompt="a red circle moving left", height=32, width=48, num_frames=9, num_inference_steps=3,
           guidance_scale=4.0, seed=2)


def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_every_linear_of_the_blocks_and_nothing_else_is_quantized(tiny_wan_dir, mode):
    plain = load_model(WanDiT, tiny_wan_dir / "transformer", dtype=torch.bfloat16)
    model = load_model(WanDiT, tiny_wan_dir / "transformer", dtype=torch.bfloat16)
    count = quantize_blocks(model, mode)
    linears = [m for m in plain.blocks.modules() if type(m) is torch.nn.Linear]
    assert count == len(linears) == 2 * 10  # q, k, v, out of two attentions and the FFN's two, per block
    assert not any(type(m) is torch.nn.Linear for m in model.blocks.modules())
    assert type(model.proj_out) is torch.nn.Linear and type(model.condition_embedder.time_proj) is torch.nn.Linear
    quantized = [m for m in model.blocks.modules() if isinstance(m, QuantizedLinear)]
    for q, ref in zip(quantized, linears):  # 1 byte per weight and a float32 scale per output row
        assert q.qweight.element_size() == 1 and q.qweight.shape == ref.weight.shape
        assert q.scale.shape == (ref.out_features,) and q.scale.dtype == torch.float32
    # at a real layer's width the scales are noise: a 1536 x 1536 layer in 0.50 of its bf16 bytes
    big = QuantizedLinear.of(torch.nn.Linear(1536, 1536).to(torch.bfloat16), mode)
    assert big.qweight.numel() + 4 * big.scale.numel() <= 0.55 * 2 * 1536 * 1536
    for q, ref in zip(quantized, linears):  # each weight within its format's rounding, per row
        err = (q.dequantized(torch.float32) - ref.weight.float()).abs().amax(dim=1)
        step = ref.weight.float().abs().amax(dim=1) / (127 if mode == "int8" else 8)
        assert bool((err <= step).all())


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_a_quantized_engine_generates_close_to_the_unquantized_one(tiny_wan_dir, mode):
    ref = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32").generate(**RUN).frames
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", quantize=mode)
    assert gen.pipeline.components["transformer"].quantized == mode
    out = gen.generate(**RUN).frames
    assert psnr(out, ref) >= 30.0  # dB
    assert psnr(out, ref) < math.inf  # the weights really changed


def test_quantize_options(tiny_wan_dir, tmp_path):
    with pytest.raises(ValueError, match="quantize: expected int8, fp8 or none"):
        EngineConfig(quantize="int4")
    args = ["generate", "--model", str(tiny_wan_dir), "--prompt", "a cat", "--height", "32", "--width", "48",
            "--num-frames", "9", "--steps", "2", "--dtype", "fp32", "--quiet"]
    assert cli_main(args + ["--quantize", "int8", "--output", str(tmp_path / "q.npy")]) == 0
    assert cli_main(args + ["--output", str(tmp_path / "p.npy")]) == 0
    assert 30.0 <= psnr(np.load(tmp_path / "q.npy"), np.load(tmp_path / "p.npy")) < math.inf


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_a_bf16_checkpoint_is_quantized_as_stored_never_widened_whole(tiny_wan_dir, tmp_path_factory, mode):
    """An fp32 engine quantizing a bf16 checkpoint reads each block weight as stored (a view of the
    mapped file) and quantizes it from there: no float32 copy of a block's Linear weights is ever
    made, and the replaced layers are not kept alive by the blocks' widening hooks. The video is
    that of the checkpoint widened whole and then quantized (bf16 -> fp32 is exact)."""
    import gc
    import weakref

    from vidloom.loader.components import _plan_dit
    from vidloom.loader.plan import stored_blocks

    from .memory.test_stored_blocks import bf16_copy

    folder = bf16_copy(tiny_wan_dir, tmp_path_factory)
    assert stored_blocks(0, torch.float32, mode) and not stored_blocks(0, torch.bfloat16, mode)
    _, load = _plan_dit(folder / "transformer")
    stored = load(torch.device("cpu"), torch.float32, True, stored=True)
    replaced = [weakref.ref(m) for m in stored.blocks.modules() if type(m) is torch.nn.Linear]
    assert {m.weight.dtype for m in stored.blocks.modules() if type(m) is torch.nn.Linear} == {torch.bfloat16}
    quantize_blocks(stored, mode)
    gc.collect()
    assert replaced and all(ref() is None for ref in replaced)
    widened = load(torch.device("cpu"), torch.float32, True, stored=False)
    quantize_blocks(widened, mode)
    for a, b in zip(stored.blocks.modules(), widened.blocks.modules()):
        if isinstance(a, QuantizedLinear):
            assert torch.equal(a.qweight.view(torch.uint8), b.qweight.view(torch.uint8))
            assert torch.equal(a.scale, b.scale)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, stored.config.in_channels, 3, 4, 6, generator=g)
    text = torch.randn(1, 7, stored.config.text_dim, generator=g)
    t = torch.tensor([500.0])
    with torch.no_grad():
        assert torch.equal(stored(x, t, text), widened(x, t, text))
    gen = VideoGenerator.from_pretrained(folder, dtype="fp32", quantize=mode)
    dit = gen.pipeline.residency.loaded("transformer")
    assert {p.dtype for p in dit.blocks.parameters()} <= {torch.int8, torch.float8_e4m3fn, torch.float32,
                                                           torch.bfloat16}
    assert not any(type(m) is torch.nn.Linear for m in dit.blocks.modules())
    assert gen.generate(**RUN).frames.shape == (9, 32, 48, 3)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_the_text_encoder_quantized_but_its_ffn_output(tiny_wan_dir, mode):
    """``quantize_text_encoder``: every Linear of UMT5's blocks but ``DenseReluDense.wo`` (kept as
    transformers keeps it, declared in the loader's UMT5 spec); the video stays close."""
    ref = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32").generate(**RUN).frames
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", quantize_text_encoder=mode)
    encoder = gen.pipeline.residency.loaded("text_encoder")
    blocks = encoder.encoder.block
    plain = [name for name, m in blocks.named_modules() if type(m) is torch.nn.Linear]
    quantized = [name for name, m in blocks.named_modules() if isinstance(m, QuantizedLinear)]
    assert plain and all(name.endswith("DenseReluDense.wo") for name in plain)
    assert len(quantized) == len(blocks) * 6  # q, k, v, o, wi_0, wi_1 per block
    assert gen.pipeline.residency.loaded("transformer").blocks[0].attn1.to_q.__class__ is torch.nn.Linear
    out = gen.generate(**RUN).frames
    assert 30.0 <= psnr(out, ref) < math.inf
    with pytest.raises(ValueError, match="quantize_text_encoder: expected int8, fp8 or none"):
        EngineConfig(quantize_text_encoder="int4")


def test_unmerged_adapters_on_quantized_layers(tiny_wan_dir, pairs, tmp_path):
    """An adapter loaded unmerged on an int8 engine: its update is added in full precision to the
    quantized layer's output, for the requests naming it only; the video is close to the
    unquantized engine's with the adapter merged."""
    from vidloom.lora import AdaptedLinear

    file = write_diffusers(pairs, tmp_path / "a.safetensors")
    merged = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", loras=[file]).generate(**RUN).frames
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", quantize="int8")
    plain = gen.generate(**RUN).frames
    gen.load_lora(file, name="a")
    q = gen.pipeline.residency.loaded("transformer").blocks[0].attn1.to_q
    assert isinstance(q, AdaptedLinear) and isinstance(q.base, QuantizedLinear)
    assert np.array_equal(gen.generate(**RUN).frames, plain)  # a request naming no adapter: as before
    out = gen.generate(**RUN, lora=[("a", 1.0)]).frames
    assert 30.0 <= psnr(out, merged) < math.inf and psnr(out, plain) < 30.0


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantized_weights_at_every_memory_level(tiny_wan_dir, mode):
    """Levels 2-3 load the quantized components at their use and drop them after (quantized again
    at each load): the video is level 1's exactly, and level 0's within fp32 rounding (levels from 1
    decode frame by frame)."""
    from .numerics import rel_err

    options = dict(dtype="fp32", quantize=mode, quantize_text_encoder=mode)
    level0 = VideoGenerator.from_pretrained(tiny_wan_dir, **options).generate(**RUN).frames
    level1 = VideoGenerator.from_pretrained(tiny_wan_dir, low_mem_level=1, **options).generate(**RUN).frames
    assert rel_err(level1, level0) <= 1e-4
    for level in (2, 3):
        gen = VideoGenerator.from_pretrained(tiny_wan_dir, low_mem_level=level, **options)
        assert np.array_equal(gen.generate(**RUN).frames, level1)
        assert np.array_equal(gen.generate(**RUN).frames, level1)  # the transformer loaded and quantized again
        assert gen.pipeline.residency.loads["transformer"] == 2
