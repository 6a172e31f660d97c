"""Compiled blocks (torch.compile, regional): the compiled engine generates the eager video (fp32
<= 1e-5, bf16 within bf16's rounding), compiles at load (warm-up) without graph breaks, and
refuses the memory levels whose hooks stream the blocks."""

from __future__ import annotations

import pytest
import torch

from vidloom import EngineConfig, VideoGenerator
from vidloom.loader.weights import load_model
from vidloom.models.compiled import compile_blocks, is_compiled
from vidloom.models.wan_dit import WanDiT

from ..numerics import rel_err

REQUEST = dict(prompt="a red circle moving left", height=48, width=64, num_frames=9, num_inference_steps=3,
               guidance_scale=4.0, seed=5)
SIZE = dict(height=48, width=64, num_frames=9)


@pytest.mark.parametrize("dtype,tolerance", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_a_compiled_engine_generates_the_eager_video(tiny_wan_dir, dtype, tolerance):
    from torch._dynamo.utils import counters

    eager = VideoGenerator.from_pretrained(tiny_wan_dir, dtype=dtype).generate(**REQUEST).frames
    counters.clear()
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype=dtype, compile=True, size_hint=SIZE)
    assert is_compiled(gen.pipeline.components["transformer"])
    assert counters["stats"]["unique_graphs"] >= 1  # the warm-up compiled the block
    compiled = gen.generate(**REQUEST).frames
    assert rel_err(compiled, eager) <= tolerance
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compile_refuses_the_streaming_levels(tiny_wan_dir):
    with pytest.raises(ValueError, match="compile: runs at low_mem_level 0 or 1"):
        EngineConfig(compile=True, low_mem_level=2)
    model = load_model(WanDiT, tiny_wan_dir / "transformer")
    model.blocks[0].register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match="the blocks carry forward hooks"):
        compile_blocks(model)
    with pytest.raises(ValueError, match="has no repeated blocks"):
        compile_blocks(torch.nn.Linear(2, 2))
