"""Several GPUs on NCCL: sequence parallel (SP=2), CFG parallel and both give the one-process
video on CUDA; the parallel tiled VAE decode gives the one-process tiled decode.

The ranks run tests/distributed/worker.py (through tests/cuda/nccl_worker.py, which also reports
each rank's process-group backend and device) under torchrun, as tests/distributed/test_parallel.py
does on gloo, with the engine option device="cuda": each rank must take cuda:LOCAL_RANK and the
default group must be NCCL. TF32 is off in the ranks (NVIDIA_TF32_OVERRIDE=0) and in this process.

Bound: fp32 relative error <= 1e-5, as for gloo (README: "Equal to one process within 1e-5");
the shards change only the row counts of the matmuls, and the attention of each head is whole.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from .common import DEVICE, DRY_RUN_ON_CPU, rel_err, requires_cuda

# the CPU dry run (tests/cuda/common.py) runs the same launches on gloo, with 4 CPU "devices"
GPUS = 4 if DRY_RUN_ON_CPU else torch.cuda.device_count() if torch.cuda.is_available() else 0
BACKEND = "gloo" if DRY_RUN_ON_CPU else "nccl"
pytestmark = [
    pytest.mark.cuda,
    requires_cuda,
    pytest.mark.skipif(GPUS < 2, reason=f"needs 2 CUDA devices, torch.cuda.device_count() is {GPUS}"),
]

WORKER = Path(__file__).with_name("nccl_worker.py")
LAUNCH_TIMEOUT_S = 240  # a hang ends here; a normal run takes well under a minute
PARALLEL_RTOL = 1e-5


def launch(nproc: int, model_dir: Path, request: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    request_path = tmp_path / "request.json"
    request_path.write_text(json.dumps(request))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(WORKER), str(model_dir), str(request_path), str(tmp_path / "out.npy")]
    env = {**os.environ, "NVIDIA_TF32_OVERRIDE": "0"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env)


def check_ranks(proc: subprocess.CompletedProcess, nproc: int) -> None:
    """Every rank reported NCCL and its own GPU, cuda:LOCAL_RANK."""
    for rank in range(nproc):
        line = next((l for l in proc.stdout.splitlines() if l.startswith(f"rank {rank}: backend=")), None)
        assert line is not None, proc.stdout + proc.stderr[-4000:]
        assert f"backend={BACKEND}" in line, line
        device = "cpu" if DRY_RUN_ON_CPU else f"cuda:{rank}"  # one node: local rank == rank
        assert f"device={device} local_rank={rank}" in line, line


@pytest.fixture(scope="module")
def single(tiny_wan_dir):
    from vidloom import VideoGenerator

    return VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", device=DEVICE)


# 48x48 pixels, 9 frames: a 3x3x3 token grid (27 tokens, odd: padded for 2 ranks); 48x64: 36 tokens
@pytest.mark.parametrize("engine,nproc,size", [
    ({"sp_size": 2}, 2, (48, 48)),
    ({"sp_size": 2}, 2, (48, 64)),
    ({"cfg_parallel": True}, 2, (48, 48)),
    ({"sp_size": 2, "cfg_parallel": True}, 4, (48, 48)),
], ids=["sp2-uneven", "sp2-even", "cfg2", "sp2xcfg2-uneven"])
def test_parallel_generation_on_nccl_equals_one_process(tiny_wan_dir, single, no_tf32, tmp_path, engine, nproc,
                                                         size):
    if GPUS < nproc:
        pytest.skip(f"needs {nproc} CUDA devices, torch.cuda.device_count() is {GPUS}")
    height, width = size
    request = dict(prompt="a red circle moving left", height=height, width=width, num_frames=9,
                   num_inference_steps=3, guidance_scale=4.0)
    latents = torch.randn(1, 4, 3, height // 8, width // 8, generator=torch.Generator().manual_seed(0))
    torch.save(latents, tmp_path / "latents.pt")
    expected = single.generate(latents=latents, **request).frames
    proc = launch(nproc, tiny_wan_dir, dict(request, engine={**engine, "device": DEVICE},
                                            latents_path=str(tmp_path / "latents.pt")), tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_ranks(proc, nproc)
    for kind in (["sequence=UlyssesSequenceParallel"] if engine.get("sp_size", 1) > 1 else []) + \
            (["cfg=CFGParallel"] if engine.get("cfg_parallel") else []):
        assert proc.stdout.count(kind) == nproc, proc.stdout
    parallel = np.load(tmp_path / "out.npy")
    assert parallel.shape == expected.shape
    err = rel_err(parallel, expected)
    assert err <= PARALLEL_RTOL, f"parallel vs one process rel err {err:.2e}"


def test_parallel_vae_decode_on_nccl_equals_the_one_process_tiled_decode(tiny_wan_dir, single, no_tf32, tmp_path):
    z = torch.randn(1, 4, 3, 12, 16, generator=torch.Generator().manual_seed(2))  # 4 x 6 tiles, overlap 1
    torch.save(z, tmp_path / "z.pt")
    vae = single.pipeline.components["vae"]
    with torch.inference_mode():
        expected = vae.decode_tiled(z, tile_latent=4, overlap_latent=1).cpu().numpy()
    proc = launch(2, tiny_wan_dir, dict(mode="vae-decode", engine={"sp_size": 2, "device": DEVICE},
                                        latents_path=str(tmp_path / "z.pt"), tile=4, overlap=1), tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_ranks(proc, 2)
    parallel = np.load(tmp_path / "out.npy")
    assert parallel.shape == expected.shape == (1, 3, 9, 96, 128)
    err = rel_err(parallel, expected)
    assert err <= 1e-6, f"parallel decode rel err {err:.2e}"  # the same tiles, decoded in other processes
