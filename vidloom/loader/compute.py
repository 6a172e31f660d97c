"""The dtype each loaded component computes in, decided once by the loader.

The loader records it on the component (``record_compute_dtype``) from the engine's dtype
choices and the device; stages and pipelines read it with ``compute_dtype``. Nothing reads a
weight's dtype to decide what to compute in: a weight may be stored in another dtype than the one
its layer computes in (float32-kept norms, a quantized Linear), and that must not change the
dtype of the activations around it.
"""

from __future__ import annotations

import torch

ATTRIBUTE = "compute_dtype"


def record_compute_dtype(component: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Declare that ``component`` computes in ``dtype`` (its activations' dtype); returns it."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"compute dtype must be a floating-point torch.dtype, got {dtype!r}")
    setattr(component, ATTRIBUTE, dtype)
    return component


def compute_dtype(component) -> torch.dtype:
    """The dtype ``component`` computes in, as recorded when it was loaded."""
    dtype = getattr(component, ATTRIBUTE, None)
    if dtype is None:
        raise ValueError(f"{type(component).__name__} has no recorded compute dtype: load it through "
                         "vidloom.loader (or declare one with loader.compute.record_compute_dtype)")
    return dtype
