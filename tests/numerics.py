"""The one relative error every parity and equivalence test states its tolerance in."""

from __future__ import annotations

import numpy as np
import torch


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| over the whole output, in float64, for numpy arrays or torch tensors on any device."""
    a = a.detach().double().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)
    b = b.detach().double().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
