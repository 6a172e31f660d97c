from __future__ import annotations

import torch

from ..base import PipelineStage, VerificationResult, is_tensor
from ..batch import ForwardBatch


class TimestepPreparationStage(PipelineStage):
    """Scheduler sigmas and timesteps for the request's step count and flow shift."""

    name = "timestep_preparation"

    def __init__(self, scheduler, device: torch.device):
        self.scheduler = scheduler
        self.device = device

    def forward(self, batch: ForwardBatch) -> ForwardBatch:
        p = batch.params
        schedule = self.scheduler.schedule(p.num_inference_steps, shift=p.flow_shift, device=self.device)
        batch.schedule = schedule
        batch.timesteps, batch.sigmas = schedule.timesteps, schedule.sigmas
        batch.scheduler_state = self.scheduler.init_state()
        batch.step_index = batch.begin_index = 0
        return batch

    def verify_output(self, batch: ForwardBatch) -> VerificationResult:
        n = batch.params.num_inference_steps
        return (
            VerificationResult(self.name, "output")
            .check("timesteps", is_tensor(batch.timesteps, 1) and len(batch.timesteps) == n, f"must hold {n} steps")
            .check("sigmas", is_tensor(batch.sigmas, 1), "must be 1-D")
        )
