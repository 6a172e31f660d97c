"""Requests, the task API, bad input and numerical failure on a tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vidloom import InvalidRequestError, NumericalError, TaskCancelled, TaskState, VideoGenerator

from .devices import device_type
from .numerics import rel_err

SMALL = dict(height=32, width=48, num_frames=5, num_inference_steps=3)
OTHER_SIZE = dict(height=48, width=64, num_frames=9, num_inference_steps=2)  # another token grid


@pytest.fixture(scope="module")
def gen(tiny_wan_dir):
    return VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32")


@pytest.fixture(scope="module")
def gen_on_device(tiny_wan_dir, device, gen):
    """``gen`` on the CPU; a generator of its own on another device."""
    if device_type(device) == "cpu":
        return gen
    return VideoGenerator.from_pretrained(tiny_wan_dir, device=device, dtype="fp32")


def same(a, b) -> None:
    assert a.shape == b.shape
    assert np.array_equal(a, b), f"not bit-exact: rel err {rel_err(a, b):.2e}"


@pytest.mark.parametrize(
    "field,kwargs",
    [
        ("height", dict(height=40)),
        ("height", dict(height=0)),
        ("width", dict(width=100)),
        ("num_frames", dict(num_frames=10)),
        ("num_frames", dict(num_frames=0)),
        ("num_inference_steps", dict(num_inference_steps=0)),
        ("guidance_scale", dict(guidance_scale=-1.0)),
        ("guidance_scale", dict(guidance_scale=float("nan"))),
        ("prompt", dict(prompt=123)),
        ("negative_prompt", dict(negative_prompt=["x"])),
        ("output_type", dict(output_type="webm")),
        ("fps", dict(fps=0)),
        ("flow_shift", dict(flow_shift=-2.0)),
        ("latents", dict(latents=torch.zeros(1, 4, 3, 4, 6))),
        ("latents", dict(latents=np.zeros((1, 4, 2, 4, 6)))),
        ("output_path", dict(output_path="clip.webm")),
        ("output_path", dict(output_type="mp4", output_path="clip.gif")),
        ("nonsense", dict(nonsense=1)),
    ],
)
def test_bad_input_names_the_field_and_engine_stays_usable(gen, field, kwargs):
    args = {**SMALL, **kwargs}
    prompt = args.pop("prompt", "a cat")
    with pytest.raises(InvalidRequestError) as err:
        gen.generate(prompt, **args)
    assert err.value.field == field
    assert str(err.value).startswith(field)
    assert "\n" not in str(err.value)
    # the engine still serves a good request afterwards
    out = gen.generate("a cat", **SMALL)
    assert out.frames.shape == (5, 32, 48, 3)


def test_bad_input_is_rejected_before_any_work(gen):
    calls = []
    hook = gen.pipeline.components["text_encoder"].register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(InvalidRequestError):
            gen.submit("a cat", height=33)
    finally:
        hook.remove()
    assert calls == []


def test_output_frames_layout(gen):
    out = gen.generate("a dog", **SMALL)
    assert isinstance(out.frames, np.ndarray) and out.frames.dtype == np.float32
    assert out.frames.shape == (5, 32, 48, 3)
    assert 0.0 <= out.frames.min() and out.frames.max() <= 1.0
    pt = gen.generate("a dog", output_type="pt", **SMALL)
    assert isinstance(pt.frames, torch.Tensor) and torch.equal(pt.frames, torch.from_numpy(out.frames))
    assert set(out.timings) >= {"text_encoding", "denoising", "decoding"}


def test_seed_is_deterministic_and_matters(gen):
    a = gen.generate("a dog", seed=1, **SMALL).frames
    b = gen.generate("a dog", seed=1, **SMALL).frames
    c = gen.generate("a dog", seed=2, **SMALL).frames
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_task_api_progress_and_callback(gen):
    seen = []
    task = gen.submit("a fox", callback=lambda step, total, t, lat: seen.append((step, total, t)), **SMALL)
    assert task.state == TaskState.QUEUED and task.progress == 0.0
    progress = [task.progress]
    states = []
    while not task.is_finished:
        gen.step(task)
        progress.append(task.progress)
        states.append(task.status)
    assert task.state == TaskState.DONE and task.progress == 1.0
    assert progress == sorted(progress)
    assert [s[0] for s in seen] == [1, 2, 3] and all(s[1] == 3 for s in seen)
    assert seen[0][2] == 999.0
    assert "denoising 2/3" in states and "decoding" in states
    direct = gen.generate("a fox", **SMALL)
    assert np.array_equal(task.result.frames, direct.frames)


def test_interleaved_tasks_equal_separate_runs(gen_on_device, device):
    """Bit-exact on every device: the interleaved and the lone runs launch the same kernels on the
    same shapes on one device (and one CUDA stream), and every kernel on this path is deterministic
    in the forward direction (on CUDA: cuBLAS for a given GPU and toolkit; SDPA's flash and
    memory-efficient forward kernels and cuDNN's forward convolutions, benchmark mode off, pick the
    same algorithm for the same shapes and use no atomics). The tasks share only read-only modules
    (and the DiT's rotary cache, keyed by the token grid), so a difference would mean state leaking
    between tasks."""
    gen, seen_devices = gen_on_device, set()

    def callback(step, total, timestep, latents):
        seen_devices.add(device_type(latents.device))

    requests = {
        "a": ("a red ball", dict(seed=4, **SMALL)),
        "b": ("a blue cube", dict(seed=5, guidance_scale=2.0, **SMALL)),
        "c": ("a green star", dict(seed=6, **OTHER_SIZE)),
    }
    tasks = {k: gen.submit(p, callback=callback, **kw) for k, (p, kw) in requests.items()}
    while not all(t.is_finished for t in tasks.values()):
        for t in tasks.values():
            gen.step(t)
    assert seen_devices == {device_type(device)}
    for key, (prompt, kwargs) in requests.items():
        task = tasks[key]
        assert task.state == TaskState.DONE, (key, task.state, task.error)
        alone = gen.generate(prompt, **kwargs)
        same(task.result.frames, alone.frames)
        assert device_type(task.result.latents.device) == device_type(device)
        same(task.result.latents.cpu().numpy(), alone.latents.cpu().numpy())


def test_cancel(gen_on_device, device):
    gen = gen_on_device
    task = gen.submit("a fox", **SMALL)
    gen.step(task)
    gen.step(task)
    task.cancel()
    gen.step(task)
    assert task.state == TaskState.CANCELLED and task.is_finished and task.result is None
    with pytest.raises(TaskCancelled):
        gen.run(task)
    # a task cancelled mid-denoising leaves the generator usable on its device
    mid = gen.submit("a fox", **SMALL)
    while mid.status != "denoising 1/3":
        assert not mid.is_finished, mid.status
        gen.step(mid)
    mid.cancel()
    gen.step(mid)
    assert mid.state == TaskState.CANCELLED
    out = gen.generate("a fox", **SMALL)
    assert out.frames.shape == (5, 32, 48, 3) and np.isfinite(out.frames).all()
    if device_type(device) == "cuda":
        torch.cuda.synchronize()  # an asynchronous kernel error would surface here


def test_nan_in_denoising_names_the_step(gen):
    dit = gen.pipeline.components["transformer"]
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 2 else output

    handle = dit.register_forward_hook(poison)
    try:
        with pytest.raises(NumericalError) as err:
            gen.generate("a fox", **SMALL)
    finally:
        handle.remove()
    assert err.value.step == 2 and "step 2" in str(err.value)
    assert gen.generate("a fox", **SMALL).frames.shape[0] == 5


def test_trajectory(gen):
    out = gen.generate("a fox", return_trajectory=True, decode_trajectory=True, **SMALL)
    assert len(out.trajectory_latents) == 3 and len(out.trajectory_frames) == 3
    assert torch.equal(out.trajectory_latents[-1], out.latents)
    assert np.allclose(out.trajectory_frames[-1], out.frames)


def test_mp4_output(gen, tmp_path):
    out = gen.generate("a fox", output_type="mp4", output_path=str(tmp_path / "v.mp4"), fps=8, **SMALL)
    assert out.path.is_file() and out.path.stat().st_size > 0
    assert "export" in out.timings


def test_default_mp4_paths_never_collide(gen, tiny_wan_dir, tmp_path, monkeypatch):
    """Two generators (each counting tasks from 1) writing in the same second get files of their own."""
    monkeypatch.chdir(tmp_path)
    other = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32")
    a = gen.generate("a fox", output_type="mp4", seed=1, **SMALL)
    b = other.generate("a cat", output_type="mp4", seed=2, **SMALL)
    assert a.path != b.path and a.path.parent == b.path.parent == Path("outputs")
    assert a.path.read_bytes() != b.path.read_bytes()


def test_upper_case_npy_suffix(gen, tmp_path):
    out = gen.generate("a fox", output_path=str(tmp_path / "x.NPY"), **SMALL)
    assert np.array_equal(np.load(tmp_path / "x.NPY"), out.frames)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.NPY"]  # no temporary file left
