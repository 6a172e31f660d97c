"""Pyramid attention broadcast: attention outputs reused across steps in the middle of the
schedule, per request, without a trace in the model file: periods 1 are exact, the counts are the
attention evaluations that really ran, the modules behave as before for requests without it, and
requests interleaved each get their own video."""

from __future__ import annotations

import pytest
import torch

from vidloom import InvalidRequestError
from vidloom.cache.spec import PAB, CacheSpec, parse_cache

SIZE = dict(height=32, width=48, num_frames=5)
KW = dict(seed=4, num_inference_steps=10, guidance_scale=4.0, **SIZE)


def frames(out):
    return torch.as_tensor(out.frames)


def test_the_pab_field_parses_and_bad_ones_name_the_field():
    assert parse_cache("pab:2:4") == CacheSpec(blocks=PAB(2, 4))
    for bad, message in (("pab:0:4", "outside"), ("pab:2.5:4", "whole numbers"), ("pab:2", "two periods"),
                         ("pab:2:4+block:0.1", "one block-skipping")):
        with pytest.raises(InvalidRequestError, match=message) as info:
            parse_cache(bad)
        assert info.value.field == "cache"


def test_periods_of_one_are_exact_and_plain_requests_are_untouched(tiny_generator):
    plain = tiny_generator.generate("a cat", **KW)
    exact = tiny_generator.generate("a cat", cache="pab:1:1", **KW)
    assert torch.equal(frames(exact), frames(plain)) and "attention_reused" not in exact.cache
    tiny_generator.generate("a cat", cache="pab:3:5", **KW)  # the modules now take plans ...
    assert torch.equal(frames(tiny_generator.generate("a cat", **KW)), frames(plain))  # ... and run as before without


def test_the_counts_are_the_attention_evaluations_that_ran(tiny_generator):
    model = tiny_generator.pipeline.residency.loaded("transformer")
    ran = {"self": 0, "cross": 0}
    hooks = [getattr(block, name).to_q.register_forward_hook(lambda *a, kind=kind: ran.__setitem__(kind, ran[kind] + 1))
             for block in model.blocks for name, kind in (("attn1", "self"), ("attn2", "cross"))]
    try:
        out = tiny_generator.generate("a cat", cache="pab:2:4", **KW)
    finally:
        for h in hooks:
            h.remove()
    # 10 steps, steps 1-8 broadcast: self computed at 1, 3, 5, 7 (reused 4), cross at 1, 5 (reused 6);
    # one batched-CFG forward a step, 2 blocks
    assert ran == {"self": (10 - 4) * 2, "cross": (10 - 6) * 2}
    assert out.cache["attention_computed"] == sum(ran.values()) and out.cache["attention_reused"] == (4 + 6) * 2
    plain = tiny_generator.generate("a cat", **KW)
    assert 0 < (frames(out) - frames(plain)).abs().max() < 0.2


def test_interleaved_pab_requests_each_get_their_own_video(tiny_generator):
    requests = [("a cat", dict(KW, cache="pab:2:4")), ("a dog", dict(KW, seed=8, cache="pab:3:3")),
                ("a bird", dict(KW, seed=2))]
    alone = [tiny_generator.generate(p, **kw) for p, kw in requests]
    tasks = [tiny_generator.submit(p, **kw) for p, kw in requests]
    while not all(t.is_finished for t in tasks):
        tiny_generator.step_many([t for t in tasks if not t.is_finished])
    for task, expected in zip(tasks, alone):
        assert task.result.cache == expected.cache
        assert (frames(task.result) - frames(expected)).abs().max() <= 1e-5
