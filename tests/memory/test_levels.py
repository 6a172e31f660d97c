"""Memory levels move bytes, never numbers: every level gives the level-0 video; level 2 keeps one
model component in memory at a time, each loaded when used and really released; out of memory
in a unit is recovered by running that unit again at the next level, with the same video; at the
highest level it is a ResourceExhausted naming the stage and level, and the engine goes on."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from vidloom import EngineConfig, VideoGenerator
from vidloom.errors import ResourceExhausted
from vidloom.memory.levels import LevelResidency, level_now

from ..numerics import rel_err

KW = dict(height=32, width=48, num_frames=9, num_inference_steps=3, guidance_scale=4.0, seed=3)


@pytest.fixture(scope="module")
def level0(tiny_wan_dir):
    return VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32")


@pytest.fixture(scope="module")
def reference(level0):
    return level0.generate("a cat", **KW).frames


@pytest.fixture(scope="module")
def streamed(tiny_wan_dir):
    """The level-1 video: the level-0 one up to the decode's step sizes (fp32, <= 1e-5)."""
    return VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", low_mem_level=1).generate("a cat", **KW).frames


class Watching(LevelResidency):
    """Records, at every use, which model components are in memory."""

    def __init__(self, device, level):
        super().__init__(device, level)
        self.seen: list[tuple[str, tuple[str, ...]]] = []

    def acquire(self, name):
        module = super().acquire(name)
        self.seen.append((name, tuple(self.in_memory())))
        return module


class OutOfMemoryWhen:
    """The stage's model call, which runs out of memory (torch's error, allocating ``asked``)
    whenever ``when(rows)`` says so."""

    def __init__(self, inner, when, asked: str):
        self.inner, self.when, self.asked = inner, when, asked

    def __call__(self, model, x, t, context_kv, rows):
        if self.when(rows):
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {self.asked} (injected)")
        return self.inner(model, x, t, context_kv, rows)

    def batch_key(self, batch, expert):
        return self.inner.batch_key(batch, expert)

    def exchanged(self, prediction, rows):
        return self.inner.exchanged(prediction, rows)


def watched(folder, level, monkeypatch, **options) -> tuple[VideoGenerator, Watching]:
    import vidloom.memory.residency as residency_mod

    made = []

    def residency_for(config):
        made.append(Watching(config.torch_device, config.low_mem_level))
        return made[0]

    monkeypatch.setattr(residency_mod, "residency_for", residency_for)
    monkeypatch.setattr("vidloom.generator.residency_for", residency_for)
    gen = VideoGenerator.from_pretrained(folder, dtype="fp32", low_mem_level=level, **options)
    return gen, made[0]


def test_every_level_gives_the_level_0_video(tiny_wan_dir, reference, streamed):
    """Level 1 decodes in one-frame steps (the same video up to float rounding: fp32, <= 1e-5);
    level 2 only moves components, so it equals level 1 exactly."""
    assert rel_err(streamed, reference) <= 1e-5
    level2 = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", low_mem_level=2).generate("a cat", **KW)
    assert np.array_equal(level2.frames, streamed)


def test_level_1_decodes_one_frame_per_step(tiny_wan_dir, monkeypatch):
    from vidloom.models.wan_vae import WanStreamDecoder

    budgets = []
    real = WanStreamDecoder._push

    def push(self, z, patches):
        budgets.append(self.step_elements)
        return real(self, z, patches)

    monkeypatch.setattr(WanStreamDecoder, "_push", push)
    VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", low_mem_level=1).generate("a cat", **KW)
    assert budgets == [1]
    VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32").generate("a cat", **KW)
    assert budgets == [1, None]  # level 0: the VAE's default steps


def test_level_2_keeps_one_component_and_loads_each_when_used(tiny_wan_dir, streamed, monkeypatch):
    gen, policy = watched(tiny_wan_dir, 2, monkeypatch)
    assert policy.in_memory() == []  # nothing loaded with the engine
    out = gen.generate("a cat", **KW)
    assert np.array_equal(out.frames, streamed)
    assert [name for name, _ in policy.seen] == ["text_encoder"] + ["transformer"] * 3 + ["vae"]
    assert all(loaded == (name,) for name, loaded in policy.seen)  # only the one in use
    assert dict(policy.loads) == {"text_encoder": 1, "transformer": 1, "vae": 1}
    policy.seen.clear()
    again = gen.generate("a cat", **KW)  # both prompts cached: the text encoder is not needed
    assert np.array_equal(again.frames, streamed)
    assert [name for name, _ in policy.seen] == ["transformer"] * 3 + ["vae"]
    assert dict(policy.loads) == {"text_encoder": 1, "transformer": 2, "vae": 2}


def test_a_released_component_is_really_freed(tiny_wan_dir, monkeypatch):
    """Nothing keeps a released module: once dropped, it is collected (its memory returns)."""
    gen, policy = watched(tiny_wan_dir, 2, monkeypatch)
    gen.generate("a cat", **KW)
    alive = {name: weakref.ref(policy.components()[name]) for name in policy.in_memory()}
    assert list(alive) == ["vae"]
    gen.generate("a dog", **KW)  # the text encoder, then the transformer, then the VAE again
    gc.collect()
    assert alive["vae"]() is None


def test_out_of_memory_in_decoding_is_recovered_at_the_next_level(tiny_wan_dir, reference, caplog):
    """The whole decode runs out of memory; the unit runs again at level 1 (streaming decode)."""
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32")
    vae = gen.pipeline.components["vae"]

    def whole_decode(z, clamp=True):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB (injected)")

    vae.decode = whole_decode
    task = gen.submit("a cat", **KW)
    out = gen.run(task)
    assert task.memory_level == 1 and rel_err(out.frames, reference) <= 1e-5
    assert "out of memory in decoding at low_mem_level 0 (3.00 GiB); running it again at level 1" in caplog.text
    assert gen.submit("a cat", **KW).memory_level == 0  # the next request starts at the engine's level


def test_out_of_memory_in_a_denoising_step_is_recovered_at_the_next_levels(tiny_wan_dir, reference, streamed):
    """A step runs out of memory while other components are resident (levels 0 and 1); at level 2
    they are released first and the step succeeds: the same video; then a request at level 0
    again (its released components loaded when used)."""
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32")
    stage, residency = gen.pipeline.denoising, gen.pipeline.residency
    inner, failures = stage.call, []

    def crowded(rows):
        if residency.in_memory() != ["transformer"]:
            failures.append(level_now(0))
            return True
        return False

    stage.call = OutOfMemoryWhen(inner, crowded, "1.00 GiB")
    task = gen.submit("a cat", **KW)
    out = gen.run(task)
    assert failures == [0, 1] and task.memory_level == 2
    assert np.array_equal(out.frames, streamed)  # decoded at level 2 too
    stage.call = inner
    assert np.array_equal(gen.generate("a cat", **KW).frames, reference)  # level 0 again


def test_out_of_memory_at_the_highest_level_names_the_stage_and_level(tiny_wan_dir, streamed):
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", low_mem_level=1)
    vae = gen.pipeline.components["vae"]
    real = type(vae).stream_decoder

    def no_memory(self, clamp=True):
        raise MemoryError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123456 bytes")

    type(vae).stream_decoder = no_memory
    try:
        with pytest.raises(ResourceExhausted, match=r"out of memory in decoding at low_mem_level 3, the highest"
                                                    r" \(it tried to allocate 123456 bytes\)"):
            gen.generate("a cat", **KW)
    finally:
        type(vae).stream_decoder = real
    assert np.array_equal(gen.generate("a cat", **KW).frames, streamed)  # the engine goes on


def test_low_mem_level_is_checked():
    for bad in (-1, 4, 1.5, True, "2"):
        with pytest.raises(ValueError, match="low_mem_level"):
            EngineConfig(low_mem_level=bad)


def test_the_server_survives_an_out_of_memory_job_and_runs_the_next(tiny_wan_dir, tmp_path):
    """Two jobs in one engine loop, stepped together: one runs out of memory at every level and
    fails as out_of_memory; the other, and a job after it, complete."""
    import time

    from vidloom.serve.scheduler import EngineLoop
    from vidloom.serve.store import COMPLETED, FAILED, QUEUED, Job, SQLiteJobStore

    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32")
    stage = gen.pipeline.denoising
    inner = stage.call

    stage.call = OutOfMemoryWhen(inner, lambda rows: any(o.params.prompt == "a huge cat" for o in rows.owners),
                                 "9.00 GiB")
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    request = dict(height=32, width=48, num_frames=5, num_inference_steps=2)
    for k, prompt in enumerate(("a huge cat", "a dog", "a bird")):
        store.add(Job(id=f"video_{k}", status=QUEUED, model="m", prompt=prompt, seconds="1", size="48x32",
                      request=dict(request, prompt=prompt), inputs={}, created_at=time.time() + k))
    loop = EngineLoop(gen, store, tmp_path, idle_wait_s=0.01, max_active=2)
    for _ in range(60):
        loop._fill()
        loop._advance_all()
        if all(store.get(f"video_{k}").status in (COMPLETED, FAILED) for k in range(3)):
            break
    jobs = [store.get(f"video_{k}") for k in range(3)]
    store.close()
    assert jobs[0].status == FAILED and jobs[0].error_code == "out_of_memory", jobs[0]
    assert "at low_mem_level 3, the highest" in jobs[0].error_message
    assert [job.status for job in jobs[1:]] == [COMPLETED, COMPLETED], jobs


def test_a_released_component_returns_its_memory(tiny_wan_dir, tmp_path):
    """Level 2 with weights read into the process's own memory (map_weights=False): when the VAE
    is used the DiT is released, and the process's resident size falls by at least 80 % of the
    DiT's bytes (tolerance for the allocator's own bookkeeping)."""
    import shutil
    import sys

    from vidloom.loader.weights import save_model
    from vidloom.models.wan_dit import WanDiT, WanDiTConfig
    from vidloom.tiny import TINY_TRANSFORMER

    if not sys.platform.startswith("linux"):
        pytest.skip("resident size from /proc")
    folder = tmp_path / "wide"
    shutil.copytree(tiny_wan_dir, folder)
    shutil.rmtree(folder / "transformer")
    config = dict(TINY_TRANSFORMER, num_attention_heads=8, attention_head_dim=64, ffn_dim=2048, num_layers=4)
    save_model(WanDiT(WanDiTConfig.from_dict(config)), folder / "transformer")
    gen = VideoGenerator.from_pretrained(folder, dtype="fp32", low_mem_level=2, map_weights=False)
    residency = gen.pipeline.residency

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    with residency.use("transformer") as dit:
        size = sum(p.numel() * p.element_size() for p in dit.parameters())
        del dit
    assert size > 40 * 2**20
    held = rss()
    with residency.use("vae"):
        gc.collect()
        released = held - rss()
    assert residency.in_memory() == ["vae"]
    assert released >= 0.8 * size, (released, size)
