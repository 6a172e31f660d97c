"""Ring attention and hybrid (Ulysses x ring, USP) sequence parallelism on gloo: transformers
whose head count the sequence-parallel degree does not divide generate the one-process video,
with and without padding of uneven sequences, and combined with CFG parallel."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from vidloom import EngineConfig, VideoGenerator
from vidloom.parallel import check_layout

from ..numerics import rel_err
from .test_parallel import launch


def heads_folder(tiny_wan_dir, tmp_path_factory, heads: int):
    """The tiny Wan folder with a transformer of ``heads`` attention heads (12 dims each)."""
    from diffusers import WanTransformer3DModel

    from vidloom import tiny

    folder = tmp_path_factory.mktemp(f"tiny_wan_{heads}_heads")
    shutil.copytree(tiny_wan_dir, folder, dirs_exist_ok=True)
    shutil.rmtree(folder / "transformer")
    torch.manual_seed(heads)
    WanTransformer3DModel(**{**tiny.TINY_TRANSFORMER, "num_attention_heads": heads}).save_pretrained(
        folder / "transformer")
    return folder


@pytest.fixture(scope="module")
def three_heads(tiny_wan_dir, tmp_path_factory):
    return heads_folder(tiny_wan_dir, tmp_path_factory, 3)


@pytest.fixture(scope="module")
def six_heads(tiny_wan_dir, tmp_path_factory):
    return heads_folder(tiny_wan_dir, tmp_path_factory, 6)


def run_parallel(folder, engine: dict, nproc: int, size, tmp_path, frames: int = 9):
    height, width = size
    request = dict(prompt="a red circle moving left", height=height, width=width, num_frames=frames,
                   num_inference_steps=3, guidance_scale=4.0)
    latents = torch.randn(1, 4, (frames - 1) // 4 + 1, height // 8, width // 8,
                          generator=torch.Generator().manual_seed(0))
    torch.save(latents, tmp_path / "latents.pt")
    single = VideoGenerator.from_pretrained(folder, dtype="fp32").generate(latents=latents, **request).frames
    proc = launch(nproc, folder, dict(request, engine=engine, latents_path=str(tmp_path / "latents.pt")), tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("sequence=RingSequenceParallel") == nproc, proc.stdout  # every rank rang
    return np.load(tmp_path / "out.npy"), single


# 48x48: a 3x3x3 token grid (27 tokens: padded for 2 and 4 ranks); 48x64: 36 tokens
@pytest.mark.parametrize("size", [(48, 48), (48, 64)], ids=["uneven", "even"])
def test_ring_sp2_on_three_heads_equals_one_process(three_heads, tmp_path, size):
    parallel, single = run_parallel(three_heads, {"sp_size": 2, "ring_size": 2}, 2, size, tmp_path)
    assert rel_err(parallel, single) <= 1e-5  # fp32


def test_usp_2x2_on_six_heads_equals_one_process(six_heads, tmp_path):
    """sp_size=4 does not divide 6 heads; 2 Ulysses ranks x a ring of 2 does. 27 tokens over 4."""
    parallel, single = run_parallel(six_heads, {"sp_size": 4, "ring_size": 2}, 4, (48, 48), tmp_path)
    assert rel_err(parallel, single) <= 1e-5  # fp32


def test_a_ring_block_of_padding_alone_is_never_attended(three_heads, tmp_path):
    """One frame of 48x32: 6 tokens over a ring of 4 (2 each, padded to 8): the last rank's keys
    are all padding."""
    parallel, single = run_parallel(three_heads, {"sp_size": 4, "ring_size": 4}, 4, (48, 32), tmp_path, frames=1)
    assert np.isfinite(parallel).all() and rel_err(parallel, single) <= 1e-5  # fp32


def test_ring_sp2_with_cfg_parallel_equals_one_process(three_heads, tmp_path):
    parallel, single = run_parallel(three_heads, {"sp_size": 2, "ring_size": 2, "cfg_parallel": True}, 4, (48, 48),
                                    tmp_path)
    assert rel_err(parallel, single) <= 1e-5  # fp32


def test_ring_layouts_are_checked_before_loading():
    check_layout(2, False, 2, num_heads=3, ring_size=2)
    check_layout(4, True, 8, num_heads=6, ring_size=2)
    with pytest.raises(ValueError, match=r"splits the transformer's 3 attention heads over 2 Ulysses ranks.*"
                                         r"allowed ring_size for sp_size=2: 2"):
        check_layout(2, False, 2, num_heads=3)
    with pytest.raises(ValueError, match=r"allowed ring_size for sp_size=4: 2, 4"):
        check_layout(4, False, 4, num_heads=6, ring_size=1)
    with pytest.raises(ValueError, match=r"ring_size: expected a divisor of sp_size=4 \(allowed: 1, 2, 4\), got 3"):
        EngineConfig(sp_size=4, ring_size=3)
    with pytest.raises(ValueError, match="does not combine with ring attention"):
        EngineConfig(sp_size=2, ring_size=2, sta_window="1,2,2")


def test_a_request_window_on_a_ring_engine_is_refused_at_check(tiny_wan_dir):
    import dataclasses

    from vidloom.errors import InvalidRequestError

    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32")
    gen.config = dataclasses.replace(gen.config, sp_size=2, ring_size=2)  # as a ring engine's rank sees it
    with pytest.raises(InvalidRequestError, match=r"sta_window: sliding-tile attention does not combine with this "
                                                  r"engine's ring attention \(ring_size=2\)"):
        gen.check("a cat", height=48, width=48, num_frames=9, sta_window="1,2,2")
    gen.check("a cat", height=48, width=48, num_frames=9, sta_window="dense")
