from __future__ import annotations

import torch

from ..base import PipelineStage, VerificationResult, is_tensor
from ..batch import ForwardBatch


class TextEncodingStage(PipelineStage):
    """Prompt (and negative prompt, with guidance) -> embeddings in the DiT's dtype."""

    name = "text_encoding"

    def __init__(self, text_encoder, target_dtype: torch.dtype, device: torch.device):
        self.text_encoder = text_encoder
        self.target_dtype = target_dtype
        self.device = device

    def verify_input(self, batch: ForwardBatch) -> VerificationResult:
        return VerificationResult(self.name, "input").check(
            "params.prompt", isinstance(batch.params.prompt, str), "must be a string"
        )

    def forward(self, batch: ForwardBatch) -> ForwardBatch:
        p = batch.params
        prompts = [p.prompt]
        if p.do_cfg:
            prompts.append(p.negative_prompt or "")
        # both prompts in one encoder call: they share the padded length
        embeds = self.text_encoder.encode(prompts, p.max_sequence_length).to(self.device, self.target_dtype)
        batch.prompt_embeds = embeds[:1]
        batch.negative_embeds = embeds[1:] if p.do_cfg else None
        return batch

    def verify_output(self, batch: ForwardBatch) -> VerificationResult:
        r = VerificationResult(self.name, "output")
        r.check("prompt_embeds", is_tensor(batch.prompt_embeds, 3), "must be (B, L, D)")
        if batch.params.do_cfg:
            r.check("negative_embeds", is_tensor(batch.negative_embeds, 3), "must be (B, L, D) with guidance")
        return r
