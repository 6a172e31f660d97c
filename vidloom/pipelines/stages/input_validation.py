from __future__ import annotations

from ...config import RequestLimits, SamplingParams
from ...errors import InvalidRequestError


class InputValidationStage:
    """Checks sizes (against the model's largest token grid), frames, steps, guidance and given
    latents before any tensor is made. Not a unit of work: ``VideoGenerator.check`` runs it once
    per request (through ``validate_request``), before the request is queued."""

    name = "input_validation"

    def __init__(self, limits: RequestLimits, latent_channels: int):
        self.limits = limits
        self.latent_channels = latent_channels

    def check(self, params: SamplingParams) -> SamplingParams:
        """Raise InvalidRequestError naming the first bad field of ``params``."""
        params.validate(self.limits)
        if params.latents is not None:  # the initial noise: of the base pass in a two-stage request
            shape = params.base_pass().latent_shape(self.latent_channels, self.limits.vae_spatial_factor,
                                        self.limits.temporal_factor)
            if tuple(params.latents.shape) != shape:
                raise InvalidRequestError(
                    "latents", f"shape {tuple(params.latents.shape)} does not fit the request", f"shape {shape}"
                )
        return params
