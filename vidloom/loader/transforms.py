"""Model transforms: what the loader applies between the meta-device build and the weight fill.

A transform sees the model once it is built on meta (no weights yet) and may swap modules
(``apply``): a layer that quantizes, adds an adapter or splits across processes replaces the plain
one, keeping the parameter names the checkpoint fills. It then sees every checkpoint tensor on its
way into a parameter (``fill``) and decides how it fills it: as stored (a view of the mapped
file where dtype and layout allow), converted to another dtype or layout, or through a function
of the whole stored tensor. Transforms are applied in order, each on the previous one's result.

``default_transforms()`` are the ones this CPU's capabilities choose; with none of them the
checkpoint fills parameters in its own layout (the fallback on every CPU).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .. import cpu


@dataclasses.dataclass(frozen=True)
class Fill:
    """How checkpoint tensor ``key`` fills parameter ``name`` of ``module``.

    stored       the checkpoint's dtype
    dtype        the parameter's dtype
    device       the parameter's device
    input_major  (out, in) values laid out as a transposed (in, out) matrix (see ``InputMajorBf16``)
    convert      a function of the whole stored tensor (shape kept) whose result fills the
                 parameter (cast to ``dtype``); None: the stored values
    shard        the slice of the stored tensor the parameter holds (``parallel.tensor.Shard``:
                 dim, index, count); only that slice is read. None: the whole tensor
    """

    key: str
    name: str
    module: torch.nn.Module
    stored: torch.dtype
    dtype: torch.dtype
    device: torch.device
    input_major: bool = False
    convert: Callable[[torch.Tensor], torch.Tensor] | None = None
    shard: object | None = None

    @property
    def as_stored(self) -> bool:
        """Whether the parameter can be the stored tensor itself (file dtype and layout, CPU)."""
        return (self.dtype == self.stored and self.device.type == "cpu" and not self.input_major
                and self.convert is None and self.shard is None)


class ModelTransform:
    """A step between the meta build and the fill. Both methods default to doing nothing."""

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to fill: ``model`` with modules swapped (its parameters still on meta)."""
        return model

    def fill(self, fill: Fill) -> Fill:
        """How the checkpoint tensor of ``fill`` fills its parameter."""
        return fill


class InputMajorBf16(ModelTransform):
    """bf16 Linear weights on the CPU stored input-major: (out, in) values laid out as a transposed
    (in, out) matrix. On a CPU with AMX, oneDNN's bf16 matmul runs such weights ~1.5x faster at
    the DiT's shapes (measured: 400 -> 600 GFLOP/s at 640x1536x1536); on an AVX-512 BF16 CPU
    without AMX the file's layout was 2-5 % faster (measured at 640x1536x1536 to 4608x1536x1536),
    so there this transform is not chosen and the file's layout is kept (and mapped). Values are
    unchanged."""

    def fill(self, fill: Fill) -> Fill:
        if (fill.device.type == "cpu" and fill.dtype == torch.bfloat16 and fill.name.endswith(".weight")
                and isinstance(fill.module, torch.nn.Linear)):
            return dataclasses.replace(fill, input_major=True)
        return fill


def default_transforms() -> tuple[ModelTransform, ...]:
    """The transforms this CPU's capabilities choose (``cpu.features()``, read at each load)."""
    return (InputMajorBf16(),) if cpu.features().input_major_bf16 else ()
