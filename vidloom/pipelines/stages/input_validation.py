from __future__ import annotations

from ...config import SamplingParams
from ...errors import InvalidRequestError
from ..base import PipelineStage
from ..batch import ForwardBatch


class InputValidationStage(PipelineStage):
    """Checks sizes, frames, steps, guidance and given latents before any tensor is made."""

    name = "input_validation"

    def __init__(self, spatial_factor: int, temporal_factor: int, latent_channels: int, vae_spatial_factor: int):
        self.spatial_factor = spatial_factor
        self.temporal_factor = temporal_factor
        self.latent_channels = latent_channels
        self.vae_spatial_factor = vae_spatial_factor

    def check(self, params: SamplingParams) -> SamplingParams:
        """Raise InvalidRequestError naming the first bad field of ``params``."""
        params.validate(self.spatial_factor, self.temporal_factor)
        if params.latents is not None:
            shape = params.latent_shape(self.latent_channels, self.vae_spatial_factor, self.temporal_factor)
            if tuple(params.latents.shape) != shape:
                raise InvalidRequestError(
                    "latents", f"shape {tuple(params.latents.shape)} does not fit the request", f"shape {shape}"
                )
        return params

    def forward(self, batch: ForwardBatch) -> ForwardBatch:
        self.check(batch.params)
        return batch
