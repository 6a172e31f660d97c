"""The attention entry point: backends selected through the context, the token grid handed to
self-attention, the log-sum-exp path, and an explicit sequence length under sequence parallelism."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from vidloom.loader.weights import load_model
from vidloom.models import attention as attn
from vidloom.models.attention import (
    BACKENDS, SDPA, AttentionContext, Backend, attention, attention_context, attention_with_lse, current_context,
    sdpa_attention, select_backend, sequence_parallel,
)
from vidloom.models.causal3d import AttentionBlock, fold_time, unfold_time
from vidloom.models.wan_dit import WanDiT


class CountingBackend:
    """SDPA behind a recorder: one (layout, has-bias, Lq, Lk) entry per call."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __call__(self, q, k, v, *, bias=None, layout=None, return_lse=False):
        self.calls.append((layout, bias is not None, q.shape[1], k.shape[1]))
        return sdpa_attention(q, k, v, bias=bias, layout=layout, return_lse=return_lse)


@pytest.fixture
def counting(monkeypatch):
    """A backend registered under "counting" for this test only; returns (its recorder, its record)."""
    def register(supports_bias: bool = True):
        recorder = CountingBackend()
        backend = dataclasses.replace(SDPA, name="counting", fn=recorder, supports_bias=supports_bias)
        monkeypatch.setitem(BACKENDS, "counting", backend)
        return recorder
    return register


@pytest.fixture(scope="module")
def dit(tiny_wan_dir):
    return load_model(WanDiT, tiny_wan_dir / "transformer")


@pytest.fixture(scope="module")
def dit_inputs():
    g = torch.Generator().manual_seed(3)
    # odd latent grid 3 x 4 x 6 -> a 3 x 2 x 3 token grid (18 tokens); a 5-token prompt padded to 12
    context = torch.zeros(2, 12, 16)
    context[:, :5] = torch.randn(2, 5, 16, generator=g)
    return torch.randn(2, 4, 3, 4, 6, generator=g), torch.tensor([999, 417]), context


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------------------- backends and the context

def test_a_registered_backend_serves_every_attention_of_a_forward(dit, dit_inputs, counting):
    recorder = counting()
    x, t, context = dit_inputs
    with torch.no_grad():
        kv = dit.encode_context(context)  # the padded prompt: 6 keys with a score bias
        plain = dit(x, t, context_kv=kv)
        with attention_context(AttentionContext(backend=select_backend("counting"))):
            counted = dit(x, t, context_kv=kv)
    assert torch.equal(counted, plain)  # the same kernel behind the recorder: the same output
    layers, grid = dit.config.num_layers, (3, 2, 3)
    self_calls = [c for c in recorder.calls if c[0] is not None]
    cross_calls = [c for c in recorder.calls if c[0] is None]
    # self-attention receives the token grid; cross-attention the prompt's bias
    assert self_calls == [(grid, False, 18, 18)] * layers
    assert cross_calls == [(None, True, 18, 6)] * layers


def test_a_backend_without_bias_hands_biased_calls_to_sdpa(dit, dit_inputs, counting):
    recorder = counting(supports_bias=False)
    x, t, context = dit_inputs
    with torch.no_grad():
        kv = dit.encode_context(context)
        plain = dit(x, t, context_kv=kv)
        with attention_context(AttentionContext(backend=select_backend("counting"))):
            counted = dit(x, t, context_kv=kv)
    assert torch.equal(counted, plain)
    assert recorder.calls == [((3, 2, 3), False, 18, 18)] * dit.config.num_layers  # self-attention only


def test_an_unknown_backend_is_an_error_naming_the_allowed_ones(counting):
    with pytest.raises(ValueError, match=r"attention backend: unknown 'xformers' \(allowed: flash, flex, sage, sdpa\)"):
        select_backend("xformers")
    counting()
    with pytest.raises(ValueError, match=r"unknown 'npu' \(allowed: counting, flash, flex, sage, sdpa\)"):
        select_backend("npu")
    assert select_backend("sdpa") is SDPA


def test_a_backend_refuses_a_device_or_dtype_it_lacks():
    fp32_only = dataclasses.replace(SDPA, name="fp32_only", dtypes=frozenset({torch.float32}))
    cuda_only = dataclasses.replace(SDPA, name="cuda_only", devices=frozenset({"cuda"}))
    q = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    with attention_context(AttentionContext(backend=fp32_only)):
        with pytest.raises(ValueError, match="'fp32_only': takes float32, not bfloat16"):
            attention(q, q, q, kind="self")
    with attention_context(AttentionContext(backend=cuda_only)):
        with pytest.raises(ValueError, match="'cuda_only': runs on cuda, not cpu"):
            attention(q.float(), q.float(), q.float(), kind="cross")


def test_the_kind_is_self_or_cross():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="attention kind: expected 'self' or 'cross', got 'full'"):
        attention(q, q, q, kind="full")


def test_sequence_parallel_keeps_the_selected_backend(counting):
    counting()
    backend = select_backend("counting")
    sp = object()
    assert current_context() == AttentionContext(None, SDPA)
    with attention_context(AttentionContext(backend=backend)):
        with sequence_parallel(sp) as active:
            assert active is sp and current_context() == AttentionContext(sp, backend)
        assert current_context() == AttentionContext(None, backend)
    assert current_context() == AttentionContext(None, SDPA)


# ------------------------------------------------------------------------- the log-sum-exp path

@pytest.mark.parametrize("bias_kind", ["none", "per_key", "per_row"])
@pytest.mark.parametrize("chunk", [1024, 3])
def test_the_lse_path_gives_sdpa_output_and_the_log_sum_exp(monkeypatch, bias_kind, chunk):
    monkeypatch.setattr(attn, "LSE_QUERY_CHUNK", chunk)  # 3: several query blocks, the last one short
    g = torch.Generator().manual_seed(4)
    b, lq, lk, h, d = 2, 10, 7, 3, 16
    q = torch.randn(b, lq, h, d, generator=g)
    k, v = torch.randn(b, lk, h, d, generator=g), torch.randn(b, lk, h, d, generator=g)
    bias = {
        "none": None,
        "per_key": torch.tensor([0.0] * 6 + [math.log(5)]),  # a collapsed padding
        "per_row": torch.tensor([[0.0] * 7, [0.0] * 4 + [math.log(2)] + [-math.inf] * 2]),  # stacked requests
    }[bias_kind]
    out, lse = SDPA.fn(q, k, v, bias=bias, return_lse=True)
    expected = attention(q, k, v, kind="cross", bias=bias)  # the sdpa output
    assert out.shape == expected.shape and lse.shape == (b, lq, h) and lse.dtype == torch.float32
    assert rel(out, expected) <= 1e-6
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(d)
    if bias is not None:
        scores = scores + (bias.double() if bias.ndim == 1 else bias.double()[:, None, None, :])
    assert torch.allclose(lse.double(), torch.logsumexp(scores, dim=-1).transpose(1, 2), rtol=1e-6, atol=1e-6)


def test_the_lse_path_keeps_q_dtype():
    q = torch.randn(1, 5, 2, 8, dtype=torch.bfloat16)
    out, lse = attention_with_lse(q, q, q)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    qh = q.float().transpose(1, 2)  # (B, H, L, D)
    assert rel(out.float(), F.scaled_dot_product_attention(qh, qh, qh).transpose(1, 2)) <= 1e-2


# ------------------------------------------------------------------------- sequence parallelism

class WholeSequence:
    """A one-rank sequence-parallel scheme: shards are the whole sequence plus two padding tokens,
    so the unpadded length must reach ``gather`` and ``attention`` from the caller."""

    PAD = 2

    def __init__(self):
        self.lengths: list[tuple[str, int]] = []

    def shard(self, x, phasors):
        x = F.pad(x, (0, 0, 0, self.PAD))
        return x, torch.cat([phasors, phasors.new_ones(self.PAD, phasors.shape[1])])

    def span(self, length):
        return 0, length + self.PAD

    def shard_tokens(self, t):
        return torch.cat([t, t[:, -1:].expand(-1, self.PAD, *t.shape[2:])], dim=1)

    def gather(self, x, length):
        self.lengths.append(("gather", length))
        return x[:, :length]

    def attention(self, q, k, v, length, local):
        self.lengths.append(("attention", length))
        return local(q, k[:, :length], v[:, :length])


def test_sequence_parallel_self_attention_gets_the_length_from_the_grid(dit, dit_inputs, counting):
    recorder = counting()
    x, t, context = dit_inputs
    sp = WholeSequence()
    with torch.no_grad():
        plain = dit(x, t, context)
        with attention_context(AttentionContext(backend=select_backend("counting"))), sequence_parallel(sp):
            parallel = dit(x, t, context)
    assert rel(parallel, plain) <= 1e-6
    layers = dit.config.num_layers
    assert sp.lengths == [("attention", 18)] * layers + [("gather", 18)]
    # the local kernel sees the grid and the unpadded keys, the padded queries
    assert [c for c in recorder.calls if c[0] is not None] == [((3, 2, 3), False, 20, 18)] * layers


def test_sequence_parallel_self_attention_needs_the_layout():
    q = torch.randn(1, 4, 2, 8)
    with sequence_parallel(WholeSequence()), pytest.raises(ValueError, match="needs layout"):
        attention(q, q, q, kind="self")


# ------------------------------------------------------------------------- the VAE

def test_the_vae_attention_goes_through_the_entry_point_unchanged(counting):
    recorder = counting()
    torch.manual_seed(5)
    block = AttentionBlock(8)
    x = torch.randn(1, 8, 2, 3, 5)  # (B, C, T, H, W)
    with torch.no_grad():
        out = block(x)
        with attention_context(AttentionContext(backend=select_backend("counting"))):
            counted = block(x)
        # the direct call the block made before: one head, pixels as tokens
        b, c, t, h, w = x.shape
        qkv = block.to_qkv(block.norm(fold_time(x)))
        q, k, v = qkv.reshape(b * t, 1, 3 * c, h * w).transpose(2, 3).contiguous().chunk(3, dim=-1)
        direct = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        direct = x + unfold_time(block.proj(direct), b)
    assert torch.equal(counted, out) and torch.equal(out, direct)
    assert recorder.calls == [((3, 5), False, 15, 15)]


def test_backend_record_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SDPA.name = "other"
    assert isinstance(SDPA, Backend) and SDPA.returns_lse and SDPA.supports_bias and SDPA.exact
