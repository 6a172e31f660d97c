"""``ForwardBatch``: the lean, typed record that flows through the stages."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import SamplingParams


@dataclass
class Conditioning:
    """What an image-conditioned family adds to a request, made by its image stage and read by the
    denoising stage's model input (``stages.denoising.ModelInput``):

    - ``image_embeds`` (images, tokens, width) from the image encoder (None for a transformer
      without image cross-attention);
    - ``condition`` (B, C, F, H, W): Wan2.1 I2V: channels concatenated to the latents at every step
      (the frame mask and the VAE-encoded frames); Wan2.2 TI2V: the VAE-encoded first frame
      (B, z, 1, H, W), which replaces the latents where ``frame_mask`` is 0;
    - ``frame_mask`` (1, 1, F, H, W): TI2V only, 1 where the latents are generated, 0 where they are
      given; the given tokens see timestep 0.
    """

    image_embeds: torch.Tensor | None = None
    condition: torch.Tensor | None = None
    frame_mask: torch.Tensor | None = None


@dataclass(eq=False)
class PolicyState:
    """What the denoising stage's model-call policy keeps for one request (a feature cache's
    residuals per expert and branch, say), in ``values`` as the policy keys them. The stage's
    ``begin`` makes a new one for each request's denoising phase, and it goes with the batch;
    compared by identity, so it names its request in ``Rows.owners``."""

    values: dict[Any, Any] = field(default_factory=dict)
    params: Any = None  # the phase's SamplingParams (the policy's settings, e.g. ``cache``)
    num_steps: int = 0  # steps of the phase
    step: int = 0  # the step being computed (set by the stage before each forward)
    report: dict[str, float] = field(default_factory=dict)  # what the policy did (counts), summed per video


@dataclass
class ForwardBatch:
    """``params`` is what the current phase runs: the request itself, or in a two-stage
    generation first its base pass (``SamplingParams.base_pass``) and then its refine pass;
    ``request`` is the whole request (None: ``params``); ``images`` its images as
    ``VideoGenerator.check`` decoded them (RGB PIL images: the first frame, then the last frame if
    given), which the image stages take instead of reading the files again."""

    params: SamplingParams
    request: SamplingParams | None = None
    images: tuple[Any, ...] = ()
    # encoder outputs
    prompt_embeds: torch.Tensor | None = None  # (B, L, D) in the DiT's dtype
    negative_embeds: torch.Tensor | None = None  # (B, L, D), only with guidance
    conditioning: Conditioning | None = None  # image-to-video inputs (see Conditioning)
    context_kv: Any = None  # the current expert's per-request text keys/values, [cond; uncond] rows
    context_expert: int | None = None  # which expert context_kv belongs to
    # denoising state
    timesteps: torch.Tensor | None = None  # (N,)
    sigmas: torch.Tensor | None = None  # (N+1,)
    schedule: Any = None  # the scheduler's Schedule (sigmas, timesteps, shift), read-only
    scheduler_state: Any = None  # the solver's explicit state, replaced each step
    latents: torch.Tensor | None = None  # (B, C, F, H, W) float32
    step_index: int = 0  # steps done in the current denoising phase
    begin_index: int = 0  # where in ``schedule`` the current denoising phase starts
    num_steps: int = 0  # the current denoising phase's steps
    policy_state: PolicyState | None = None  # the model-call policy's, for this request's denoising phase
    # outputs
    video: torch.Tensor | None = None  # (B, 3, T, H, W) in [0, 1], float32
    trajectory: list[torch.Tensor] = field(default_factory=list)  # latents after each step
    trajectory_video: list[torch.Tensor] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # stage name -> seconds
    policy_report: dict[str, float] = field(default_factory=dict)  # the model-call policy's counts, all phases

    @classmethod
    def for_request(cls, params: SamplingParams, images: tuple[Any, ...] = ()) -> "ForwardBatch":
        """The batch a request starts with (a two-stage request starts with its base pass);
        ``images``: its decoded images (``CheckedRequest.images``)."""
        return cls(params=params.base_pass(), request=params, images=tuple(images))

    def copy(self) -> "ForwardBatch":
        """A copy to run a unit of work on: fields are assigned on it, so the original is left as it
        was if the unit fails. Tensors are shared (stages replace them, never write into them);
        the lists and the timings are new, so appending to them leaves the original's alone."""
        return dataclasses.replace(self, trajectory=list(self.trajectory),
                                   trajectory_video=list(self.trajectory_video), timings=dict(self.timings),
                                   policy_report=dict(self.policy_report))

    def timestep(self, index: int) -> torch.Tensor:
        """The timestep of step ``index`` of the current denoising phase."""
        return self.timesteps[self.begin_index + index]
