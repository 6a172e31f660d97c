"""Residency: stages hold handles, never modules, and every use of a component on every path
(text encoding, each denoising step alone or shared by several requests, both experts, a refine
folder's transformer, image encoding, decoding) goes through the engine's one residency policy.
A recording policy written here is attached where the engine picks its policy and sees each use,
balanced; the video is the one without it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vidloom.generator as generator_mod
from vidloom import VideoGenerator
from vidloom.memory.residency import Residency

SIZE = dict(height=32, width=48, num_frames=5)


class Recording(Residency):
    """Every component resident, each use recorded as ("use", name) ... ("done", name)."""

    def __init__(self, device):
        super().__init__(device)
        self.events: list[tuple[str, str]] = []

    def acquire(self, name):
        self.events.append(("use", name))
        return super().acquire(name)

    def release(self, name):
        self.events.append(("done", name))

    def uses(self) -> list[str]:
        return [name for kind, name in self.events if kind == "use"]

    def balanced(self) -> bool:
        open_ = []
        for kind, name in self.events:
            if kind == "use":
                open_.append(name)
            elif not open_ or open_.pop() != name:
                return False
        return not open_


@pytest.fixture
def recording(monkeypatch):
    made = []

    def policy(config):
        made.append(Recording(config.torch_device))
        return made[-1]

    monkeypatch.setattr(generator_mod, "residency_for", policy)
    return made


def modules_held(obj, seen=None, depth=0) -> list[str]:
    """Paths to every torch module reachable from ``obj``'s attributes (lists, dicts, records)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        return [type(obj).__name__]
    if isinstance(obj, Residency):  # the policy is where modules live
        return []
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("vidloom"):
        items = vars(obj).items()
    else:
        return []
    return [f"{key}.{path}" for key, value in items for path in modules_held(value, seen, depth + 1)]


def test_stages_hold_handles_and_every_use_goes_through_the_policy(tiny_wan_dir, tiny_generator, recording):
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32")
    [policy] = recording
    assert gen.pipeline.residency is policy
    for stage in gen.pipeline.stages:
        assert modules_held(stage) == [], stage.name
    kwargs = dict(seed=3, num_inference_steps=3, **SIZE)
    out = gen.generate("a cat", **kwargs)
    assert policy.uses() == ["text_encoder"] + ["transformer"] * 3 + ["vae"] and policy.balanced()
    assert np.array_equal(out.frames, tiny_generator.generate("a cat", **kwargs).frames)
    # several requests: each shared step is one use of the transformer
    policy.events.clear()
    tasks = gen.submit_many(["a bird", "a dog"], **kwargs)  # prompts not seen (not in the prompt cache)
    gen.run_many(tasks)
    assert policy.uses().count("transformer") == 1 + 1 + 2  # each request's first step alone, then shared
    assert policy.uses().count("text_encoder") == 2 and policy.uses().count("vae") == 2 and policy.balanced()


def test_experts_and_a_refine_folder_are_roles_of_the_policy(tiny_wan_dir, tiny_wan_pipe, recording, tmp_path):
    from diffusers import WanPipeline, WanTransformer3DModel

    from vidloom import tiny
    from vidloom.config import RefineParams

    torch.manual_seed(1)
    parts = {k: getattr(tiny_wan_pipe, k) for k in ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")}
    WanPipeline(**parts, transformer_2=WanTransformer3DModel(**tiny.TINY_TRANSFORMER),
                boundary_ratio=0.6).save_pretrained(str(tmp_path / "two"))
    gen = VideoGenerator.from_pretrained(tmp_path / "two", dtype="fp32", refine_model=str(tiny_wan_dir))
    [policy] = recording
    for stage in gen.pipeline.stages:
        assert modules_held(stage) == [], stage.name
    gen.generate("a cat", seed=2, num_inference_steps=4, refine=RefineParams(strength=0.5, steps=2), height=64,
                 width=96, num_frames=5)
    uses = policy.uses()
    steps = [name for name in uses if "transformer" in name]
    assert steps[0] == "transformer" and "transformer_2" in steps and steps[-2:] == ["refine.transformer"] * 2
    assert uses[0] == "text_encoder" and uses[-1] == "vae" and policy.balanced()


def test_image_encoders_and_the_vae_are_used_through_the_policy(tiny_wan_pipe, recording, tmp_path):
    from PIL import Image

    from tests.parity.test_i2v_parity import build_i2v_folder

    gen = VideoGenerator.from_pretrained(build_i2v_folder(tiny_wan_pipe, tmp_path / "i2v"), dtype="fp32")
    [policy] = recording
    for stage in gen.pipeline.stages:
        assert modules_held(stage) == [], stage.name
    gen.generate("a cat", image=Image.new("RGB", (48, 32), "red"), seed=1, num_inference_steps=2, **SIZE)
    assert policy.uses() == ["text_encoder", "image_encoder", "vae", "transformer", "transformer", "vae"]
    assert policy.balanced()


def test_the_scan_finds_a_module_a_stage_would_hold(tiny_generator):
    """The check above can fail: a stage given a module instead of a handle is found."""
    class Holder:
        pass

    Holder.__module__ = "vidloom.test"
    holder = Holder()
    holder.vae = tiny_generator.pipeline.residency.loaded("vae")
    assert modules_held(holder) == ["vae.WanVAE"]
