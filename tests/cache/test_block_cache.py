"""Feature caching on the model-call seam: the block cache and CFG gating, per request.

Threshold 0 (and a gate that never opens) gives the uncached video exactly; a huge threshold
skips all but the forced steps; the counts reported are the block evaluations actually run;
cached requests run together equal each alone (no state shared between requests, branches or
experts); a bad ``cache`` is refused before any work, naming the field."""

from __future__ import annotations

import math

import pytest
import torch

from vidloom import InvalidRequestError, VideoGenerator
from vidloom.cache.spec import BlockCache, CacheSpec, CfgGate, MagCache, TeaCache, parse_cache

SIZE = dict(height=32, width=48, num_frames=5)
KW = dict(seed=4, num_inference_steps=6, guidance_scale=4.0, **SIZE)


class BlockRows:
    """Forward hooks on every DiT block counting the rows each evaluation ran over (one row block
    per request branch: rows / video batch = branch evaluations)."""

    def __init__(self, model):
        self.counts = [0] * len(model.blocks)
        self.hooks = [block.register_forward_hook(self._hook(i)) for i, block in enumerate(model.blocks)]

    def _hook(self, i):
        def hook(module, args, out):
            self.counts[i] += args[0].shape[0]
        return hook

    def close(self):
        for h in self.hooks:
            h.remove()


def frames(out):
    return torch.as_tensor(out.frames)


@pytest.mark.parametrize("text, spec", [
    ("block:F1B0:0.08", CacheSpec(blocks=BlockCache(1, 0, 0.08))),
    ("block:0.1", CacheSpec(blocks=BlockCache(1, 0, 0.1))),
    ("Block:F2B1:0+cfg-gate:0.25", CacheSpec(blocks=BlockCache(2, 1, 0.0), cfg_gate=CfgGate(0.25))),
    ("cfg-gate:1", CacheSpec(cfg_gate=CfgGate(1.0))),
    ("teacache:0.2+cfg-gate:0.5", CacheSpec(blocks=TeaCache(0.2), cfg_gate=CfgGate(0.5))),
    ("magcache:0.1", CacheSpec(blocks=MagCache(0.1, 2, 0.2))), ("magcache:0.3:K4:R0.1", CacheSpec(blocks=MagCache(0.3, 4, 0.1))),
    ("none", None), ("", None),
])
def test_the_cache_field_parses(text, spec):
    assert parse_cache(text) == spec


@pytest.mark.parametrize("value, message", [
    ("teacup:0.1", "unknown policy"), ("block:F0B0:0.1", "at least one first block"), ("block:FxB0:0.1", "F<n>B<m>"),
    ("block:F1B0:-1", "outside"), ("block:F1B0:nan", "outside"), ("cfg-gate:1.5", "outside"),
    ("block:0.1+block:0.2", "one block-skipping policy"), ("teacache:0.1+magcache:0.1", "one block-skipping"),
    ("cfg-gate:0.5+cfg-gate:0.2", "given twice"), ("magcache:0.1:Q3", "K<n> or R"), ("teacache", "one threshold"),
    ("x" * 300, "characters"), (3, "got int"),
])
def test_a_bad_cache_names_the_field(value, message):
    with pytest.raises(InvalidRequestError, match=message) as info:
        parse_cache(value)
    assert info.value.field == "cache"


def test_a_cache_is_checked_against_the_model_before_any_work(tiny_generator, monkeypatch):
    monkeypatch.setattr(tiny_generator.pipeline.denoising, "step", lambda *a: pytest.fail("work was done"))
    with pytest.raises(InvalidRequestError, match="this transformer has 2") as info:
        tiny_generator.submit("a cat", cache="block:F1B1:0.1", **KW)  # the tiny DiT has 2 blocks: none to skip
    assert info.value.field == "cache"
    with pytest.raises(InvalidRequestError, match="unknown policy"):
        tiny_generator.submit("a cat", cache="magic:1", **KW)


@pytest.mark.parametrize("cache", ["block:F1B0:0", "cfg-gate:1", "block:F1B0:0+cfg-gate:1"])
def test_threshold_zero_is_the_uncached_video_exactly(tiny_generator, cache):
    plain = tiny_generator.generate("a cat", **KW)
    cached = tiny_generator.generate("a cat", cache=cache, **KW)
    assert torch.equal(frames(cached), frames(plain))
    assert plain.cache == {} and cached.cache.get("blocks_skipped", 0) == 0 and cached.cache.get("uncond_skipped", 0) == 0


@pytest.mark.parametrize("batch_cfg", [True, False])
def test_a_huge_threshold_skips_all_but_the_forced_steps_and_the_counts_are_what_ran(tiny_wan_dir, batch_cfg):
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", batch_cfg=batch_cfg)
    model = gen.pipeline.components["transformer"]
    rows = BlockRows(model)
    try:
        out = gen.generate("a cat", cache="block:F1B0:10", **KW)
    finally:
        rows.close()
    steps, branches = KW["num_inference_steps"], 2
    assert rows.counts[0] == steps * branches  # the first block: every step, both branches
    assert rows.counts[1] == 2 * branches  # the middle: only the first and last steps
    assert out.cache["forwards"] == steps * branches
    assert out.cache["blocks_computed"] == sum(rows.counts)
    assert out.cache["blocks_skipped"] == (steps - 2) * branches
    assert out.cache["estimated_change"] > 0


def test_cfg_gate_skips_the_unconditional_branch_after_its_fraction(tiny_wan_dir):
    videos = []
    for batch_cfg in (True, False):
        gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", batch_cfg=batch_cfg)
        rows = BlockRows(gen.pipeline.components["transformer"])
        try:
            out = gen.generate("a cat", cache="cfg-gate:0.5", **KW)
        finally:
            rows.close()
        gated = KW["num_inference_steps"] - math.ceil(0.5 * KW["num_inference_steps"])
        assert out.cache["uncond_skipped"] == gated
        assert rows.counts[0] == 2 * KW["num_inference_steps"] - gated  # rows actually run
        plain = gen.generate("a cat", **KW)
        assert not torch.equal(frames(out), frames(plain))  # the gate changed something ...
        assert (frames(out) - frames(plain)).abs().mean() < 0.05  # ... and not everything
        videos.append(frames(out))
    assert (videos[0] - videos[1]).abs().max() <= 1e-5  # batched and split CFG gate alike


def test_cached_requests_together_equal_each_alone(tiny_generator):
    """Interleaved by ``run_many``: a cached request never shares a forward, its state is its own;
    an uncached request beside them still shares and is unchanged."""
    requests = [("a cat", dict(KW, cache="block:F1B0:0.05+cfg-gate:0.5")),
                ("a dog", dict(KW, seed=9, cache="block:F1B0:0.2")),
                ("a bird", dict(KW, seed=2)), ("a fish", dict(KW, seed=3))]
    alone = [tiny_generator.generate(p, **kw) for p, kw in requests]
    tasks = [tiny_generator.submit(p, **kw) for p, kw in requests]
    shared = []
    while not all(t.is_finished for t in tasks):
        shared += tiny_generator.step_many([t for t in tasks if not t.is_finished])
    assert shared and max(shared) == 2  # the two uncached requests shared forwards, the cached ones did not
    for task, expected in zip(tasks, alone):
        assert task.result.cache == expected.cache
        assert (frames(task.result) - frames(expected)).abs().max() <= 1e-5


def test_two_experts_keep_their_own_state_and_the_switch_step_runs(tiny_wan_pipe, tmp_path):
    from diffusers import WanPipeline, WanTransformer3DModel

    from vidloom import tiny

    torch.manual_seed(1)
    parts = {k: getattr(tiny_wan_pipe, k) for k in ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")}
    WanPipeline(**parts, transformer_2=WanTransformer3DModel(**tiny.TINY_TRANSFORMER),
                boundary_ratio=0.6).save_pretrained(str(tmp_path / "two"))
    gen = VideoGenerator.from_pretrained(tmp_path / "two", dtype="fp32")
    high, low = (BlockRows(gen.pipeline.components[n]) for n in ("transformer", "transformer_2"))
    try:
        out = gen.generate("a cat", cache="block:F1B0:10", **dict(KW, num_inference_steps=8))
    finally:
        high.close()
        low.close()
    high_steps, low_steps = high.counts[0] // 2, low.counts[0] // 2  # both branches every step
    assert high_steps >= 2 and low_steps >= 2 and high_steps + low_steps == 8
    # each expert's middle block ran on its own first step (no state carried over from the other
    # expert), the low-noise one on the last step too, both branches; all other steps skipped it
    assert high.counts[1] == 2 and low.counts[1] == 4
    assert out.cache["blocks_computed"] == sum(high.counts) + sum(low.counts)


def test_the_server_takes_the_cache_field_and_checks_it(tiny_generator):
    from vidloom.serve.openapi import _create_body
    from vidloom.serve.requests import parse

    request = parse({"prompt": "a cat", "size": "48x32", "cache": "block:F1B0:0.1+cfg-gate:0.5"}, "tiny", {})
    assert request.fields["cache"] == "block:F1B0:0.1+cfg-gate:0.5"
    tiny_generator.check(request.prompt, num_frames=5, **request.fields)
    bad = parse({"prompt": "a cat", "size": "48x32", "cache": "block:F1B0:-2"}, "tiny", {})
    with pytest.raises(InvalidRequestError, match="outside") as info:
        tiny_generator.check(bad.prompt, num_frames=5, **bad.fields)
    assert info.value.field == "cache"
    assert "cache" in str(_create_body())  # the documented request body names it


def test_a_two_stage_request_caches_each_pass_with_its_own_state(tiny_generator):
    from vidloom.config import RefineParams

    kw = dict(KW, height=64, width=96, num_frames=5, refine=RefineParams(scale=2, strength=0.5, steps=3))
    plain = tiny_generator.generate("a cat", **kw)
    exact = tiny_generator.generate("a cat", cache="block:F1B0:0", **kw)
    assert torch.equal(frames(exact), frames(plain))
    assert exact.cache["forwards"] == 2 * (KW["num_inference_steps"] + 3)  # both passes, both branches
    skipping = tiny_generator.generate("a cat", cache="block:F1B0:10", **kw).cache
    # each pass computes its own first and last steps (no state carried from the base pass)
    assert skipping["blocks_computed"] == 2 * (KW["num_inference_steps"] + 3) + 2 * 2 * 2
