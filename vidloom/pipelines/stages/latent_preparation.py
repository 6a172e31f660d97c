from __future__ import annotations

import torch

from ...errors import InvalidRequestError
from ..base import PipelineStage, VerificationResult, is_tensor
from ..batch import ForwardBatch


class LatentPreparationStage(PipelineStage):
    """Initial noise of the request's latent shape: given, or drawn from the seed.

    Noise is drawn on the CPU and then moved, so a seed gives the same video on any device.
    """

    name = "latent_preparation"

    def __init__(self, channels: int, spatial_factor: int, temporal_factor: int, device: torch.device):
        self.channels = channels
        self.spatial_factor = spatial_factor
        self.temporal_factor = temporal_factor
        self.device = device

    def forward(self, batch: ForwardBatch) -> ForwardBatch:
        p = batch.params
        shape = p.latent_shape(self.channels, self.spatial_factor, self.temporal_factor)
        if p.latents is not None:
            if tuple(p.latents.shape) != shape:
                raise InvalidRequestError("latents", f"shape {tuple(p.latents.shape)} does not fit the request",
                                          f"shape {shape}")
            latents = p.latents.to(self.device, torch.float32)  # checked finite at validation
        else:
            generator = torch.Generator("cpu").manual_seed(p.seed)
            latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
        batch.latents = latents
        return batch

    def verify_output(self, batch: ForwardBatch) -> VerificationResult:
        return VerificationResult(self.name, "output").check(
            "latents", is_tensor(batch.latents, 5) and batch.latents.dtype == torch.float32, "must be 5-D float32"
        )
