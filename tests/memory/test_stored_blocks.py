"""From memory level 2 a bf16 checkpoint computed in float32 is not widened whole: the DiT's and
the text encoder's blocks keep bf16 (the DiT's as views of the mapped file) and are widened one
block at a time for their forward. The video equals the widened model's exactly."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vidloom import VideoGenerator

KW = dict(height=32, width=48, num_frames=9, num_inference_steps=3, guidance_scale=4.0, seed=3)


def bf16_copy(tiny_wan_dir, tmp_path_factory):
    """The tiny folder with every floating tensor stored in bf16 (the VAE's too)."""
    folder = tmp_path_factory.mktemp("tiny_bf16") / "model"
    shutil.copytree(tiny_wan_dir, folder)
    for path in folder.rglob("*.safetensors"):
        tensors = load_file(str(path))
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}, str(path))
    return folder


@pytest.fixture(scope="module")
def bf16_dir(tiny_wan_dir, tmp_path_factory):
    return bf16_copy(tiny_wan_dir, tmp_path_factory)


def test_blocks_stay_bf16_and_the_video_is_the_widened_models(bf16_dir):
    widened = VideoGenerator.from_pretrained(bf16_dir, dtype="fp32", low_mem_level=1)
    stored = VideoGenerator.from_pretrained(bf16_dir, dtype="fp32", low_mem_level=2)
    expected = widened.generate("a cat", **KW).frames
    assert np.array_equal(stored.generate("a cat", **KW).frames, expected)
    residency = stored.pipeline.residency
    dit = residency.loaded("transformer")
    blocks = {p.dtype for n, p in dit.named_parameters() if n.startswith("blocks.") and ".norm" not in n
              and "scale_shift_table" not in n}
    assert blocks == {torch.bfloat16}
    assert dit.mapped_files  # the stored blocks are pages of the file
    assert dit.patch_embedding.weight.dtype == torch.float32 and dit.proj_out.weight.dtype == torch.float32
    assert dit.compute_dtype == torch.float32
    encoder = residency.loaded("text_encoder")
    assert {p.dtype for p in encoder.encoder.block.parameters()} == {torch.bfloat16}
    assert encoder.shared.weight.dtype == torch.bfloat16  # the token table: rows widened when looked up
    assert encoder.encoder.final_layer_norm.weight.dtype == torch.float32
    assert np.array_equal(stored.generate("a cat", **KW).frames, expected)  # the weights stay as stored after use
    assert {p.dtype for p in encoder.encoder.block.parameters()} == {torch.bfloat16}


def test_a_layer_called_alone_widens_its_own_weights(bf16_dir):
    """The DiT's cross-attention keys and values are computed outside the blocks' forward."""
    stored = VideoGenerator.from_pretrained(bf16_dir, dtype="fp32", low_mem_level=2)
    dit = stored.pipeline.residency.loaded("transformer")
    widened = VideoGenerator.from_pretrained(bf16_dir, dtype="fp32").pipeline.components["transformer"]
    context = torch.randn(2, 512, dit.config.text_dim)
    ours, theirs = dit.encode_context(context), widened.encode_context(context)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    assert dit.blocks[0].attn2.to_k.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("where", ["forward", "widening"])
def test_a_block_that_fails_is_left_stored(bf16_dir, where):
    """Out of memory inside a block's forward, or while its weights are being widened (after some
    of them were): the widened weights are dropped all the same, and the next run computes as
    before."""
    stored = VideoGenerator.from_pretrained(bf16_dir, dtype="fp32", low_mem_level=2)
    expected = stored.generate("a cat", **KW).frames
    dit = stored.pipeline.residency.loaded("transformer")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (injected)")

    if where == "forward":
        target, name, real = type(dit.blocks[1].ffn), "forward", type(dit.blocks[1].ffn).forward
    else:  # the last weight of block 1 to be widened fails: the ones before it were widened
        target, name, real = dit.blocks[1].ffn.fc_out.weight, "to", None
    setattr(target, name, out_of_memory)
    try:
        with pytest.raises(Exception):
            stored.generate("a cat", **KW)
    finally:
        if real is not None:
            setattr(target, name, real)
        else:
            delattr(target, name)
    assert {p.dtype for n, p in dit.blocks.named_parameters() if ".norm" not in n and "scale_shift" not in n} \
        == {torch.bfloat16}
    assert np.array_equal(stored.generate("a cat", **KW).frames, expected)
