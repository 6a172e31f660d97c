"""Adapters registered without being kept in memory (``register_lora``; ``vidloom serve --lora-dir``
with ``--max-loras``): loaded at the first request naming them, at most ``max_loras`` in memory,
the least recently used one that no unfinished request uses dropped to make room. A dropped and
reloaded adapter gives the same video."""

from __future__ import annotations

import numpy as np
import pytest

from vidloom import EngineConfig, InvalidRequestError, VideoGenerator
from vidloom.errors import AdaptersBusy

from .parity.test_lora_parity import pairs, write_diffusers  # noqa: F401 - pairs: a fixture

KW = dict(height=32, width=48, num_frames=5, num_inference_steps=2, guidance_scale=1.0, seed=1)


@pytest.fixture(scope="module")
def files(pairs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    return {name: write_diffusers({k: (down * sign, up) for k, (down, up) in pairs.items()},
                                  folder / f"{name}.safetensors")
            for name, sign in (("a", 1.0), ("b", -1.0), ("c", 0.5))}


def test_at_most_max_loras_in_memory_least_recently_used_dropped(tiny_wan_dir, files):
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", max_loras=2)
    for name, file in files.items():
        gen.register_lora(file, name=name)
    assert list(gen.adapters) == [] and gen.adapter_names == ["a", "b", "c"]
    first_a = gen.generate("a cat", lora=["a"], **KW).frames
    gen.generate("a cat", lora=["b"], **KW)
    assert list(gen.adapters) == ["a", "b"]
    gen.generate("a cat", lora=["a"], **KW)  # a is now the most recently used
    gen.generate("a cat", lora=["c"], **KW)
    assert list(gen.adapters) == ["a", "c"]  # b dropped
    gen.generate("a cat", lora=["b"], **KW)
    assert list(gen.adapters) == ["c", "b"] and gen.adapter_loads == {"a": 1, "b": 2, "c": 1}
    assert np.array_equal(gen.generate("a cat", lora=["a"], **KW).frames, first_a)  # dropped and loaded again
    assert gen.adapter_loads["a"] == 2
    assert not np.array_equal(gen.generate("a cat", lora=["b"], **KW).frames, first_a)


def test_an_adapter_an_unfinished_request_uses_is_never_dropped(tiny_wan_dir, files):
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", max_loras=2)
    for name, file in files.items():
        gen.register_lora(file, name=name)
    tasks = [gen.submit("a cat", lora=[name], **KW) for name in ("a", "b")]
    gen.step(tasks[0])
    with pytest.raises(AdaptersBusy, match=r"max_loras=2\) are all used by unfinished requests; 'c'"):
        gen.submit("a cat", lora=["c"], **KW)
    gen.run(tasks[0])
    third = gen.submit("a cat", lora=["c"], **KW)  # a finished: dropped for c
    assert list(gen.adapters) == ["b", "c"]
    for task in (tasks[1], third):
        assert gen.run(task).frames.shape == (5, 32, 48, 3)
    with pytest.raises(InvalidRequestError, match="no adapter named 'd' is loaded.*a, b, c"):
        gen.submit("a cat", lora=["d"], **KW)


def test_registration_checks_the_file_and_the_bound(tiny_wan_dir, files, tmp_path):
    from safetensors.torch import save_file
    import torch

    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", max_loras=1)
    bad = tmp_path / "bad.safetensors"
    save_file({"transformer.blocks.0.nothing.lora_A.weight": torch.zeros(2, 8)}, str(bad))
    with pytest.raises(ValueError, match="matches no module"):
        gen.register_lora(bad)
    assert gen.adapter_names == []
    for value in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_loras: expected an integer in 1..4096"):
            EngineConfig(max_loras=value)


def test_the_servers_loop_parks_a_job_until_its_adapter_finds_room(tiny_wan_dir, files, tmp_path):
    """``max_loras=1`` and two queued jobs naming different adapters: the second is claimed and
    parked (AdaptersBusy) while the first runs, then submitted once it finishes; both complete."""
    import time

    from vidloom.serve.scheduler import EngineLoop
    from vidloom.serve.store import COMPLETED, IN_PROGRESS, QUEUED, Job, SQLiteJobStore

    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", max_loras=1)
    for name, file in files.items():
        gen.register_lora(file, name=name)
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    for k, name in enumerate(("a", "b")):
        request = dict(prompt="a cat", lora=[[name, 1.0]], **KW)
        store.add(Job(id=f"video_{k}", status=QUEUED, model="m", prompt="a cat", seconds="1", size="48x32",
                      request=request, inputs={}, created_at=time.time() + k))
    loop = EngineLoop(gen, store, tmp_path / "videos", idle_wait_s=0.01)
    loop._fill()
    assert [job.id for job, _ in loop.active] == ["video_0"] and [job.id for job, _ in loop.parked] == ["video_1"]
    assert store.get("video_1").status == IN_PROGRESS and "video_1" in loop.held()
    for _ in range(100):
        if not loop.active and not loop.parked:
            break
        loop._record()
        loop._fill()
        loop._advance_all()
    loop._record(force=True)
    assert [store.get(f"video_{k}").status for k in (0, 1)] == [COMPLETED, COMPLETED]
    assert list(gen.adapters) == ["b"]
    store.close()
