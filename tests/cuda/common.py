"""Helpers shared by the CUDA-only tests (imported by them; not a test module itself)."""

from __future__ import annotations

import torch

from ..devices import CUDA_DEVICE, DRY_RUN_ON_CPU, requires_cuda  # noqa: F401 - imported from here
from ..numerics import rel_err  # noqa: F401 - the CUDA tests import it from here

# every module of tests/cuda starts with: pytestmark = [pytest.mark.cuda, requires_cuda]
DEVICE = CUDA_DEVICE  # "cuda", or "cpu" in the dry run (tests/devices.py)

FP32_RTOL = 1e-4  # the project's fp32 parity bound: relative error on the whole output


def device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device
