"""Training clips from the procedural world, generated once per seed and cached as uint8."""

from __future__ import annotations

import os
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ..world import make_clip, train_specs
from .loop import CheckpointError


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
    """The clips and captions, built once and cached in ``cache`` (an .npz of plain arrays: a
    cache that is not what this function wrote is a CheckpointError naming it, never unpickled)."""
    path = cache / f"clips_f{frames}_s{size}_n{clips_per_spec}_seed{seed}.npz"
    if path.exists():
        if not path.is_file():  # a directory, or a FIFO that np.load would wait on forever
            raise CheckpointError("clip cache is not a file; delete it to build the clips again", file=str(path))
        n = clips_per_spec * len(train_specs())
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError(f"a single {type(data).__name__}, not an .npz archive")
            with data:
                clips, captions = data["clips"], data["captions"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise CheckpointError(f"clip cache is not readable ({type(exc).__name__}: {exc}); delete it to build "
                                  "the clips again", file=str(path)) from exc
        if (clips.dtype != np.uint8 or clips.shape != (n, frames, size, size, 3) or captions.dtype.kind != "U"
                or captions.shape != (n,)):
            raise CheckpointError(f"clip cache holds {clips.dtype} {clips.shape} clips and {captions.dtype} "
                                  f"{captions.shape} captions, not this recipe's {n} clips; delete it to build them "
                                  "again", file=str(path))
        return clips, [str(c) for c in captions]
    clips, captions = build_clips(frames, size, clips_per_spec, seed, workers=min(16, os.cpu_count() or 1))
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, clips=clips, captions=np.array(captions))
    os.replace(tmp, path)  # atomic: an interrupted run never leaves a cut-short cache
    return clips, captions


def to_model_range(clips_uint8):
    """(N, T, H, W, 3) uint8 (numpy or torch, any device) -> torch (N, 3, T, H, W) float32 in [-1, 1]."""
    import torch

    x = torch.as_tensor(clips_uint8).float().div_(127.5).sub_(1.0)
    return x.permute(0, 4, 1, 2, 3).contiguous()
