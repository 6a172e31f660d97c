"""One rank of a multi-GPU run, started by torchrun from tests/cuda/test_parallel_cuda.py:

    python -m torch.distributed.run --nproc-per-node N nccl_worker.py MODEL_DIR REQUEST_JSON OUT_NPY

A thin wrapper around tests/distributed/worker.py (the gloo tests' rank), which it runs
unchanged for generation. It adds one line per rank, printed as soon as the engine is loaded:
the process group's backend and the device the transformer's weights are on, so the test can
check that a CUDA run is on NCCL with one GPU per rank.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
import worker  # noqa: E402  (tests/distributed/worker.py)

from vidloom import VideoGenerator  # noqa: E402

_from_pretrained = VideoGenerator.from_pretrained.__func__


def _reporting_from_pretrained(cls, *args, **kwargs):
    gen = _from_pretrained(cls, *args, **kwargs)
    dit = gen.pipeline.components["transformer"]
    backend = dist.get_backend() if dist.is_initialized() else None
    current = torch.cuda.current_device() if torch.cuda.is_available() else None
    print(f"rank {os.environ.get('RANK')}: backend={backend} device={next(dit.parameters()).device} "
          f"local_rank={os.environ.get('LOCAL_RANK')} current_device={current}", flush=True)
    return gen


VideoGenerator.from_pretrained = classmethod(_reporting_from_pretrained)


if __name__ == "__main__":
    worker.main()
