"""The prompt-embedding cache: a repeated prompt (the negative prompt above all) is not encoded
again, the embeddings it returns are the ones stored, it stays within its bounds, and a video
made from cached embeddings is the video made without the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidloom import VideoGenerator
from vidloom.pipelines.stages import PromptCache

from ..numerics import rel_err

KW = dict(height=32, width=48, num_frames=5, num_inference_steps=2, guidance_scale=4.0, seed=3)


class CountingEncoder:
    """The stage's text encoder, recording the prompts of every call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def encode(self, prompts, max_sequence_length):
        self.calls.append(list(prompts))
        return self.inner.encode(prompts, max_sequence_length)


@pytest.fixture
def counted(tiny_wan_dir):
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32")
    [stage] = [s for s in gen.pipeline.stages if s.name == "text_encoding"]
    stage.text_encoder = CountingEncoder(stage.text_encoder)
    return gen, stage


def test_a_repeated_prompt_is_not_encoded_again(counted):
    gen, stage = counted
    first = gen.generate("a cat", negative_prompt="blurry", **KW)
    assert stage.text_encoder.calls == [["a cat", "blurry"]]
    gen.generate("a dog", negative_prompt="blurry", **KW)  # the negative prompt from the cache
    assert stage.text_encoder.calls[-1] == ["a dog"]
    again = gen.generate("a cat", negative_prompt="blurry", **KW)  # both from the cache: no encoder
    assert len(stage.text_encoder.calls) == 2
    assert np.array_equal(first.frames, again.frames)


def test_cached_embeddings_are_the_stored_ones_and_the_video_is_unchanged(tiny_wan_dir, counted):
    gen, stage = counted
    gen.generate("a dog", negative_prompt="blurry", **KW)
    stored = stage.encode(["a dog", "blurry"], 512)
    fresh = stage.text_encoder.inner.encode(["a dog", "blurry"], 512)
    assert torch.equal(stored, stage.encode(["a dog", "blurry"], 512))  # handed out as stored
    assert rel_err(stored, fresh) <= 1e-5  # fp32: rows encoded alone vs together
    stored[0].zero_()  # a copy: the caller cannot change the cache
    assert not torch.equal(stored, stage.encode(["a dog", "blurry"], 512))
    plain = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", prompt_cache_size=0)
    for prompt in ("a dog", "a cat"):  # "blurry" cached from the first request on `gen`
        assert rel_err(gen.generate(prompt, negative_prompt="blurry", **KW).frames,
                       plain.generate(prompt, negative_prompt="blurry", **KW).frames) <= 1e-5


def test_the_cache_stays_within_its_bounds():
    row = torch.zeros(8, 4)  # 128 bytes
    cache = PromptCache(max_entries=3, max_bytes=1000)
    for k in range(6):
        cache.put((f"p{k}", 8), row + k)
        assert len(cache) <= 3 and cache.nbytes <= 1000
    assert cache.get(("p0", 8)) is None and torch.equal(cache.get(("p5", 8)), row + 5)
    cache.get(("p3", 8))  # used: kept over p4 when the next one comes
    cache.put(("p6", 8), row)
    assert cache.get(("p4", 8)) is None and cache.get(("p3", 8)) is not None
    small = PromptCache(max_entries=10, max_bytes=300)  # bytes bound: two rows
    for k in range(4):
        small.put((f"p{k}", 8), row)
    assert len(small) == 2 and small.nbytes == 256
    small.put(("big", 8), torch.zeros(100, 4))  # larger than the whole bound: not stored
    assert small.get(("big", 8)) is None and len(small) == 2
    off = PromptCache(max_entries=0)
    off.put(("p", 8), row)
    assert len(off) == 0


def test_prompt_cache_size_is_checked():
    from vidloom import EngineConfig

    with pytest.raises(ValueError, match="prompt_cache_size"):
        EngineConfig(prompt_cache_size=-1)
