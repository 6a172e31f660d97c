"""Winograd F(4x4, 3x3) convolution against direct convolution (float64 reference).

Tolerances (relative error over the output, fp32): <= 1e-5 (measured ~2e-6; direct fp32 ~3e-7).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vidloom.models import winograd

from ..numerics import rel_err

torch.set_num_threads(1)


def padded_frames(x: torch.Tensor) -> torch.Tensor:
    # (C, T, H, W) -> (T, H + 2, W + 2, C) with a zero border
    return F.pad(x, (1, 1, 1, 1)).permute(1, 2, 3, 0).contiguous()


@pytest.mark.parametrize("c, co, t, h, w, band_bytes", [
    (16, 24, 3, 8, 12, None),      # one band
    (32, 16, 2, 16, 8, 1),         # one row of tiles per band
    (16, 3, 4, 12, 16, 20_000),    # few output channels (the RGB head), a few bands
    (40, 300, 1, 4, 4, None),      # large kernel: the other weight-transform branch
])
def test_conv3x3_matches_direct_3d_convolution(c, co, t, h, w, band_bytes):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(c, t + 2, h, w, generator=g)  # two frames of temporal context first
    weight = torch.randn(co, c, 3, 3, 3, generator=g) / (27 * c) ** 0.5
    bias = torch.randn(co, generator=g)
    residual = torch.randn(t, h, w, co, generator=g)
    expected = F.conv3d(F.pad(x.double(), (1, 1, 1, 1))[None], weight.double(), bias.double())[0]
    expected = expected.permute(1, 2, 3, 0) + residual.double()
    ws = winograd.Workspace()
    out = torch.empty(t, h, w, co)
    winograd.conv3x3(padded_frames(x), winograd.transform_weight(weight, ws), bias, out, ws,
                     residual=residual, band_bytes=band_bytes)
    assert rel_err(out, expected) <= 1e-5


def test_upsampling_convolution_equals_nearest_upsample_then_conv():
    g = torch.Generator().manual_seed(1)
    c, co, t, h, w = 24, 16, 2, 8, 12
    x = torch.randn(c, t, h, w, generator=g)
    weight = torch.randn(co, c, 3, 3, generator=g) / (9 * c) ** 0.5
    bias = torch.randn(co, generator=g)
    up = F.interpolate(x.double().transpose(0, 1), scale_factor=2.0, mode="nearest-exact")
    expected = F.conv2d(up, weight.double(), bias.double(), padding=1).permute(0, 2, 3, 1)  # (T, 2H, 2W, Co)
    ws = winograd.Workspace()
    kernels = winograd.upsample_phase_kernels(weight)
    out = torch.empty(t, 2 * h, 2 * w, co)
    winograd.conv3x3(padded_frames(x), winograd.transform_weight(kernels, ws), bias, out, ws, phases=2)
    assert rel_err(out, expected) <= 1e-5


def test_workspace_reuses_and_grows_buffers():
    ws = winograd.Workspace()
    a = ws.take("x", (4, 4), torch.float32, torch.device("cpu"))
    b = ws.take("x", (2, 3), torch.float32, torch.device("cpu"))
    assert b.data_ptr() == a.data_ptr()
    c = ws.take("x", (10, 10), torch.float32, torch.device("cpu"))
    assert c.shape == (10, 10) and ws.nbytes() == 400
