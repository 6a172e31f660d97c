"""The devices a test runs on: the CPU always, CUDA where torch sees it.

A test that takes the ``device`` fixture (tests/conftest.py) runs once per device: ``cpu``, and
``cuda``, which carries the ``cuda`` marker (``pytest -m cuda`` selects it, as
benchmarks/gpu_check.sh does) and is skipped with the reason where ``torch.cuda.is_available()``
is False. Tests that only make sense on CUDA (several GPUs on NCCL, CPU against CUDA) live in
tests/cuda with the same marker and skip.

VIDLOOM_CUDA_TESTS_ON_CPU=1 runs the cuda-marked tests on the CPU instead: the ``cuda`` parameter
is then "cpu", a dry run of the tests' own logic (fixtures, calls, shapes) on a machine without a
GPU. It says nothing about CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

DRY_RUN_ON_CPU = os.environ.get("VIDLOOM_CUDA_TESTS_ON_CPU") == "1"
CUDA_DEVICE = "cpu" if DRY_RUN_ON_CPU else "cuda"  # where the cuda-marked tests run
CUDA = torch.cuda.is_available()
NO_CUDA_REASON = "no CUDA device: torch.cuda.is_available() is False"

requires_cuda = pytest.mark.skipif(not (CUDA or DRY_RUN_ON_CPU), reason=NO_CUDA_REASON)

# the ``device`` fixture's parameters: the value is the torch device a test runs on, the id the device it is for
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(CUDA_DEVICE, id="cuda", marks=[pytest.mark.cuda, requires_cuda]),
]


def device_type(device: str | torch.device) -> str:
    """"cpu" or "cuda": what a per-device tolerance is looked up by (in the dry run, "cpu")."""
    return torch.device(device).type
