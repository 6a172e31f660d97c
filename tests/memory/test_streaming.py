"""Level 3: after each block of the DiT or the text encoder ran, the pages of its mapped weights
are released from the process (per-process resident size of the file mapping, from
/proc/self/smaps); the weights read again from the file are the same, so the video equals level
2's exactly; weights that are the process's own memory (not mapped) are never released."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from vidloom import VideoGenerator
from vidloom.loader.pages import mapped, release_pages
from vidloom.loader.stored import stream_blocks
from vidloom.loader.weights import load_model, save_model
from vidloom.models.wan_dit import WanDiT, WanDiTConfig
from vidloom.tiny import TINY_TRANSFORMER

KW = dict(height=32, width=48, num_frames=9, num_inference_steps=3, guidance_scale=4.0, seed=3)
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-process page residency from /proc")


def mapping_rss(path) -> int:
    """This process's resident bytes of its mappings of ``path``."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:  # a mapping's first line
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(head[1]) * 1024
    return total


@pytest.fixture(scope="module")
def wide_dit(tmp_path_factory):
    """A DiT whose blocks span many pages (dim 256, ffn 1024: 256 KiB per attention matrix)."""
    folder = tmp_path_factory.mktemp("wide_dit")
    config = dict(TINY_TRANSFORMER, num_attention_heads=4, attention_head_dim=64, ffn_dim=1024, num_layers=3)
    torch.manual_seed(0)
    save_model(WanDiT(WanDiTConfig.from_dict(config)), folder)
    return folder


def forward(model):
    torch.manual_seed(1)
    x = torch.randn(1, 4, 2, 8, 8)
    context = torch.randn(1, 8, model.config.text_dim)
    with torch.no_grad():
        return model(x, torch.tensor([500.0]), context=context)


@linux
def test_a_streamed_block_gives_back_its_pages(wide_dit):
    model = load_model(WanDiT, wide_dit)
    [path] = [snap.path for snap in model.mapped_files]
    first = forward(model)
    touched = mapping_rss(path)
    block_bytes = sum(p.numel() * p.element_size() for p in model.blocks.parameters())
    assert touched >= block_bytes  # every block's pages are resident after a plain forward
    release = [True]
    stream_blocks(model, lambda: release[0])
    again = forward(model)
    assert torch.equal(again, first)  # read again from the file: the same weights
    assert mapping_rss(path) <= touched - block_bytes * 0.9  # all but partial pages at the edges given back
    release[0] = False  # inactive (a unit below level 3): the pages stay
    forward(model)
    assert mapping_rss(path) >= touched - 64 * 1024


def test_weights_not_mapped_are_never_released(wide_dit):
    own = load_model(WanDiT, wide_dit, map_weights=False)
    assert own.mapped_storages == set() and not any(mapped(p, {p.untyped_storage().data_ptr() + 1})
                                                    for p in own.parameters())
    first = forward(own)
    stream_blocks(own, lambda: True)  # no mapping: nothing is hooked, nothing released
    assert torch.equal(forward(own), first) and torch.equal(forward(own), first)
    assert release_pages(torch.zeros(0)) == 0


@pytest.mark.parametrize("stored_dtype", ["fp32", "bf16"])
def test_level_3_gives_the_level_2_video(tiny_wan_dir, tmp_path_factory, stored_dtype):
    folder = tiny_wan_dir
    if stored_dtype == "bf16":
        from .test_stored_blocks import bf16_copy

        folder = bf16_copy(tiny_wan_dir, tmp_path_factory)
    level2 = VideoGenerator.from_pretrained(folder, dtype="fp32", low_mem_level=2).generate("a cat", **KW).frames
    gen = VideoGenerator.from_pretrained(folder, dtype="fp32", low_mem_level=3)
    assert np.array_equal(gen.generate("a cat", **KW).frames, level2)
    assert np.array_equal(gen.generate("a cat", **KW).frames, level2)  # released pages read back alike
    encoder = gen.pipeline.residency.loaded("text_encoder")
    assert encoder.mapped_storages and all(mapped(p, encoder.mapped_storages) for p in encoder.encoder.block.parameters())
