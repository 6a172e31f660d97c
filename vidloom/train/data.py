"""Training clips from the procedural world, generated once per seed and cached as uint8."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ..world import make_clip, train_specs


def _render(args: tuple) -> np.ndarray:
    spec, seed, index, frames, size = args
    # one generator per clip, seeded by (seed, index): the set is the same however it is split over processes
    rng = np.random.default_rng([seed, index])
    return np.round(make_clip(spec, rng, frames=frames, size=size).frames * 255).astype(np.uint8)


def build_clips(frames: int, size: int, clips_per_spec: int, seed: int,
                workers: int = 1) -> tuple[np.ndarray, list[str]]:
    """(N, T, H, W, 3) uint8 clips and their captions, N = clips_per_spec x training combinations."""
    specs = [s for s in train_specs() for _ in range(clips_per_spec)]
    jobs = [(spec, seed, i, frames, size) for i, spec in enumerate(specs)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            rendered = list(pool.map(_render, jobs, chunksize=16))
    else:
        rendered = [_render(job) for job in jobs]
    return np.stack(rendered), [s.caption for s in specs]


def load_or_build_clips(cache: Path, frames: int, size: int, clips_per_spec: int, seed: int):
    path = cache / f"clips_f{frames}_s{size}_n{clips_per_spec}_seed{seed}.npz"
    if path.is_file():
        data = np.load(path)
        return data["clips"], [str(c) for c in data["captions"]]
    clips, captions = build_clips(frames, size, clips_per_spec, seed, workers=min(16, os.cpu_count() or 1))
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, clips=clips, captions=np.array(captions))
    return clips, captions


def to_model_range(clips_uint8):
    """(N, T, H, W, 3) uint8 (numpy or torch, any device) -> torch (N, 3, T, H, W) float32 in [-1, 1]."""
    import torch

    x = torch.as_tensor(clips_uint8).float().div_(127.5).sub_(1.0)
    return x.permute(0, 4, 1, 2, 3).contiguous()
