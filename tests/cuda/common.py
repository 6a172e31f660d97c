"""Helpers shared by the CUDA tests (imported by them; not a test module itself)."""

from __future__ import annotations

import os

import pytest
import torch

from ..numerics import rel_err  # noqa: F401 - the CUDA tests import it from here

# VIDLOOM_CUDA_TESTS_ON_CPU=1 runs these tests on the CPU instead: a dry run of the tests' own
# logic (fixtures, calls, shapes) on a machine without a GPU. It says nothing about CUDA.
DRY_RUN_ON_CPU = os.environ.get("VIDLOOM_CUDA_TESTS_ON_CPU") == "1"
DEVICE = "cpu" if DRY_RUN_ON_CPU else "cuda"
CUDA = torch.cuda.is_available()
NO_CUDA_REASON = "no CUDA device: torch.cuda.is_available() is False"

# every module of tests/cuda starts with: pytestmark = [pytest.mark.cuda, requires_cuda]
requires_cuda = pytest.mark.skipif(not (CUDA or DRY_RUN_ON_CPU), reason=NO_CUDA_REASON)

FP32_RTOL = 1e-4  # the project's fp32 parity bound: relative error on the whole output




def device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device
