"""Fixtures of the CUDA tests. Nothing here builds a model or touches the GPU at import or
collection time: on a machine without CUDA every test skips before any fixture runs."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def no_tf32():
    """fp32 means fp32: TF32 matmuls and cuDNN convolutions off for the test, restored afterwards
    (torch's defaults are matmul TF32 off and cuDNN TF32 *on*, which would put the VAE's and the
    patch embedding's convolutions at TF32 precision, ~1e-3)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
