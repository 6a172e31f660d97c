"""Text encoding through transformers' UMT5 encoder and tokenizer.

The Wan prompt convention: clean the text (ftfy, HTML unescape, collapse whitespace),
tokenise to ``max_sequence_length`` with padding and truncation, run the encoder with the
attention mask, keep each prompt's real tokens and zero the padded positions. The
transformer cross-attends to all positions, so the padding length is part of the result.
"""

from __future__ import annotations

import html
import logging
import re

import torch

from ..memory.residency import handle_of

log = logging.getLogger(__name__)


def clean_prompt(text: str) -> str:
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy is a dependency; keep working if a user removed it
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class WanTextEncoder:
    """Tokenizer + UMT5 encoder -> zero-padded (B, max_sequence_length, d_model) embeddings."""

    def __init__(self, tokenizer, encoder):
        """``encoder``: the UMT5 encoder's handle (``memory.residency``), or the module itself."""
        self.tokenizer = tokenizer
        self.encoder = handle_of(encoder, "text_encoder")

    @property
    def dim(self) -> int:
        return self.encoder.config.d_model

    def token_count(self, prompt: str) -> int:
        """Number of tokens of the cleaned prompt, end-of-sequence token included."""
        return len(self.tokenizer(clean_prompt(prompt), add_special_tokens=True).input_ids)

    @torch.no_grad()
    def encode(self, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
        cleaned = [clean_prompt(p) for p in prompts]
        for text in cleaned:
            n = len(self.tokenizer(text, add_special_tokens=True).input_ids)
            if n > max_sequence_length:
                log.warning(
                    "prompt has %d tokens; truncated to max_sequence_length=%d: %.60s...", n, max_sequence_length, text
                )
        tokens = self.tokenizer(
            cleaned, padding="max_length", max_length=max_sequence_length, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        with self.encoder.use() as encoder:
            device = next(encoder.parameters()).device
            ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
            hidden = encoder(ids, mask).last_hidden_state  # (B, L, d_model)
        # zero every position past the prompt's own tokens
        keep = (torch.arange(hidden.shape[1], device=hidden.device)[None, :] < mask.sum(1, keepdim=True))
        return torch.where(keep[..., None], hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))


class WanImageEncoder:
    """Image processor + CLIP vision encoder (transformers) -> the Wan I2V image tokens: the
    penultimate layer's hidden states (N, 1 + patches, width), as Wan's image conditioning uses
    them (the last layer and the projection are not)."""

    def __init__(self, processor, encoder):
        """``encoder``: the CLIP vision encoder's handle (``memory.residency``), or the module itself."""
        self.processor = processor
        self.encoder = handle_of(encoder, "image_encoder")

    @torch.no_grad()
    def encode(self, images: list) -> torch.Tensor:
        """RGB PIL images -> (len(images), tokens, width) in the encoder's compute dtype."""
        pixels = self.processor(images=images, return_tensors="pt").pixel_values
        with self.encoder.use() as encoder:
            device = next(encoder.parameters()).device
            out = encoder(pixel_values=pixels.to(device, self.encoder.dtype), output_hidden_states=True)
        return out.hidden_states[-2]
