"""Tensor parallelism on gloo: the transformer's heads and FFN units split over two processes
(alone, with sequence parallelism and with CFG parallel) give the one-process video, and each
process holds about half of the transformer's parameter bytes, read as shards from the file."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from vidloom import EngineConfig, VideoGenerator
from vidloom.loader.weights import load_model
from vidloom.models.wan_dit import WanDiT
from vidloom.parallel import check_layout
from vidloom.parallel.tensor import ColumnParallelLinear, RowParallelLinear, ShardedRMSNorm, TensorParallel

from ..numerics import rel_err
from .test_parallel import launch
from .test_ring import heads_folder


@pytest.fixture(scope="module")
def four_heads(tiny_wan_dir, tmp_path_factory):
    return heads_folder(tiny_wan_dir, tmp_path_factory, 4)


@pytest.mark.parametrize("engine,nproc", [
    ({"tp_size": 2}, 2),
    ({"tp_size": 2, "sp_size": 2}, 4),
    ({"tp_size": 2, "cfg_parallel": True}, 4),
], ids=["tp2", "tp2xsp2", "tp2xcfg2"])
def test_tensor_parallel_equals_one_process_with_half_the_weights_per_rank(four_heads, tmp_path, engine, nproc):
    request = dict(prompt="a red circle moving left", height=48, width=48, num_frames=9, num_inference_steps=3,
                   guidance_scale=4.0)  # 27 tokens: uneven over 2 sequence-parallel ranks
    latents = torch.randn(1, 4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    torch.save(latents, tmp_path / "latents.pt")
    one = VideoGenerator.from_pretrained(four_heads, dtype="fp32")
    single = one.generate(latents=latents, **request).frames
    whole = sum(p.numel() * p.element_size() for p in one.pipeline.components["transformer"].parameters())
    proc = launch(nproc, four_heads, dict(request, engine=engine, latents_path=str(tmp_path / "latents.pt")), tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("tp=2 ") == nproc, proc.stdout
    per_rank = [int(b) for b in re.findall(r"dit_bytes=(\d+)", proc.stdout)]
    # the blocks' projections and FFN are halved (but the biases added after the all-reduce);
    # embeddings, modulation and the head are whole
    blocks = sum(p.numel() * p.element_size() for n, p in one.pipeline.components["transformer"].named_parameters()
                 if re.search(r"\.(attn[12]\.(to_|add_|norm_[qk]|norm_added)|ffn\.)", n)
                 and not re.search(r"(to_out|fc_out)\.bias$", n))
    assert per_rank == [whole - blocks // 2] * nproc
    assert 0.5 * whole < per_rank[0] < 0.7 * whole  # tiny model: its embeddings and head are a large share
    # the text encoder: its attention, relative position bias and FFN halved; the embedding whole
    te = one.pipeline.components["text_encoder"]
    te_whole = sum(p.numel() * p.element_size() for p in te.parameters())
    te_layers = sum(p.numel() * p.element_size() for n, p in te.named_parameters()
                    if re.search(r"\.(SelfAttention\.(q|k|v|o|relative_attention_bias)|DenseReluDense\.w)", n))
    assert [int(b) for b in re.findall(r"te_bytes=(\d+)", proc.stdout)] == [te_whole - te_layers // 2] * nproc
    parallel = np.load(tmp_path / "out.npy")
    assert rel_err(parallel, single) <= 1e-5  # fp32


def test_the_transform_swaps_the_declared_layers_and_reads_shards(four_heads, monkeypatch):
    """In one process (a group of one is never reached: forward is not run) the plan swaps each
    declared module and the loader fills each from its slice of the stored tensor."""
    whole = load_model(WanDiT, four_heads / "transformer")
    for rank in (0, 1):
        sharded = load_model(WanDiT, four_heads / "transformer", transforms=(TensorParallel(None, 2, rank),))
        block, ref = sharded.blocks[1], whole.blocks[1]
        assert isinstance(block.attn1.to_q, ColumnParallelLinear) and isinstance(block.attn2.to_v, ColumnParallelLinear)
        assert isinstance(block.attn1.to_out, RowParallelLinear) and isinstance(block.ffn.fc_out, RowParallelLinear)
        assert isinstance(block.attn1.norm_q, ShardedRMSNorm) and block.attn1.heads == block.attn2.heads == 2
        rows = slice(rank * 24, (rank + 1) * 24)  # dim 48: 4 heads of 12
        assert torch.equal(block.attn1.to_q.weight, ref.attn1.to_q.weight[rows])
        assert torch.equal(block.attn1.to_q.bias, ref.attn1.to_q.bias[rows])
        assert torch.equal(block.attn2.to_out.weight, ref.attn2.to_out.weight[:, rows])
        assert torch.equal(block.attn2.to_out.bias, ref.attn2.to_out.bias)
        assert torch.equal(block.attn1.norm_k.weight, ref.attn1.norm_k.weight[rows])
        hidden = slice(rank * 16, (rank + 1) * 16)  # ffn_dim 32
        assert torch.equal(block.ffn.fc_in.proj.weight, ref.ffn.fc_in.proj.weight[hidden])
        assert torch.equal(block.ffn.fc_out.weight, ref.ffn.fc_out.weight[:, hidden])
        assert torch.equal(sharded.proj_out.weight, whole.proj_out.weight)


def test_the_text_encoder_loads_its_shard_of_each_layer(four_heads):
    """UMT5 under the plan beside its loader spec: heads, position bias and FFN units split."""
    from transformers import UMT5EncoderModel

    from vidloom.loader.components import UMT5, _load_transformers_sharded
    from vidloom.parallel.tensor import ShardedEmbedding

    whole = UMT5EncoderModel.from_pretrained(str(four_heads / "text_encoder"), dtype=torch.float32)
    for rank in (0, 1):
        te = _load_transformers_sharded(UMT5, four_heads / "text_encoder", "cpu", torch.float32,
                                        TensorParallel(None, 2, rank))
        attn, ref = te.encoder.block[1].layer[0].SelfAttention, whole.encoder.block[1].layer[0].SelfAttention
        assert attn.n_heads == 1 and attn.inner_dim == 8 and isinstance(attn.relative_attention_bias, ShardedEmbedding)
        rows = slice(rank * 8, (rank + 1) * 8)  # 2 heads of 8
        assert torch.equal(attn.q.weight, ref.q.weight[rows]) and torch.equal(attn.o.weight, ref.o.weight[:, rows])
        assert torch.equal(attn.relative_attention_bias.weight, ref.relative_attention_bias.weight[:, rank:rank + 1])
        ffn, ref_ffn = te.encoder.block[0].layer[1].DenseReluDense, whole.encoder.block[0].layer[1].DenseReluDense
        hidden = slice(rank * 16, (rank + 1) * 16)  # d_ff 32
        assert torch.equal(ffn.wi_1.weight, ref_ffn.wi_1.weight[hidden])
        assert torch.equal(ffn.wo.weight, ref_ffn.wo.weight[:, hidden])
        assert torch.equal(te.shared.weight, whole.shared.weight) and te.encoder.embed_tokens.weight is te.shared.weight


def test_tensor_parallel_layouts_are_checked_before_loading():
    check_layout(2, True, 8, num_heads=12, tp_size=2)
    with pytest.raises(ValueError, match=r"tp_size=2 x sp_size=1 x cfg degree 1 .* needs 2 processes, but the "
                                         r"world size is 1"):
        check_layout(1, False, 1, tp_size=2)
    with pytest.raises(ValueError, match=r"tp_size=2 must divide the transformer's 3 attention heads \(allowed: 1, 3\)"):
        check_layout(1, False, 2, num_heads=3, tp_size=2)
    with pytest.raises(ValueError, match=r"splits the transformer's 2 attention heads \(per tensor-parallel rank\) "
                                         r"over 4 Ulysses ranks"):
        check_layout(4, False, 8, num_heads=4, tp_size=2)
    with pytest.raises(ValueError, match=r"tp_size: expected an integer"):
        EngineConfig(tp_size=0)
