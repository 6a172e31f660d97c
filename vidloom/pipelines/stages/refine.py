from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import Phase, PipelineStage, VerificationResult, is_tensor
from ..batch import ForwardBatch


class RefineStage(PipelineStage):
    """Two-stage generation, between the base pass's denoising and the refine pass's: the base
    latents (1/scale of the request's size) are upsampled to the full size (bilinear in every
    latent frame), and noised back to the level the refine pass starts at, the flow interpolation
    ``(1 - sigma) x + sigma noise`` with ``sigma`` its schedule's level at ``begin_index``. The refine
    schedule, solver state and ``begin_index`` are set, and the batch's params become the refine
    pass's. A request without ``refine`` has no unit here (see ``config.RefineParams``)."""

    name = "refine"
    phase = Phase.DENOISING

    def __init__(self, scheduler, spatial_factor: int, device: torch.device):
        self.scheduler = scheduler
        self.spatial_factor = spatial_factor  # pixels per latent pixel (the VAE's)
        self.device = device

    def num_units(self, batch: ForwardBatch) -> int:
        return int((batch.request or batch.params).refine is not None)

    def verify_input(self, batch: ForwardBatch) -> VerificationResult:
        return VerificationResult(self.name, "input").check("latents", is_tensor(batch.latents, 5), "must be 5-D")

    @torch.no_grad()
    def forward(self, batch: ForwardBatch) -> ForwardBatch:
        request = batch.request
        refine = request.refine
        up = F.interpolate(batch.latents, scale_factor=(1, refine.scale, refine.scale), mode="trilinear",
                           align_corners=False)
        schedule = self.scheduler.schedule(refine.schedule_steps(request), shift=request.flow_shift,
                                           device=self.device)
        begin = len(schedule.timesteps) - refine.run_steps(request)
        sigma = schedule.sigmas[begin].to(up)
        generator = torch.Generator("cpu").manual_seed((request.seed + 1) % 2**64)
        noise = torch.randn(up.shape, generator=generator, dtype=torch.float32).to(up.device)
        batch.latents = (1 - sigma) * up + sigma * noise
        batch.schedule = schedule
        batch.timesteps, batch.sigmas = schedule.timesteps, schedule.sigmas
        batch.scheduler_state = self.scheduler.init_state(begin)
        batch.begin_index, batch.step_index = begin, 0
        batch.params = request.refine_pass()
        return batch

    def verify_output(self, batch: ForwardBatch) -> VerificationResult:
        p, sf = batch.params, self.spatial_factor
        return VerificationResult(self.name, "output").check(
            "latents", tuple(batch.latents.shape[-2:]) == (p.height // sf, p.width // sf),
            f"must be the latent size of {p.height}x{p.width}")
