from __future__ import annotations

from collections import OrderedDict

import torch

from ..base import PipelineStage, VerificationResult, is_tensor
from ..batch import ForwardBatch


class PromptCache:
    """The embeddings of recent prompts, least recently used dropped first, bounded by a count and
    by bytes: a prompt seen again (the negative prompt above all) needs no text encoder, so a
    memory level that releases the encoder seldom loads it again. An embedding is stored as the
    encoder gave it (one row) and handed out as a copy."""

    def __init__(self, max_entries: int = 32, max_bytes: int = 256 * 2**20):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._rows: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: tuple) -> torch.Tensor | None:
        row = self._rows.get(key)
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        self._rows.move_to_end(key)
        return row.clone()

    def put(self, key: tuple, row: torch.Tensor) -> None:
        size = row.numel() * row.element_size()
        if self.max_entries < 1 or size > self.max_bytes:
            return
        old = self._rows.pop(key, None)
        if old is not None:
            self.nbytes -= old.numel() * old.element_size()
        self._rows[key] = row.detach().clone()
        self.nbytes += size
        while len(self._rows) > self.max_entries or self.nbytes > self.max_bytes:
            _, dropped = self._rows.popitem(last=False)
            self.nbytes -= dropped.numel() * dropped.element_size()

    def clear(self) -> None:
        self._rows.clear()
        self.nbytes = 0


class TextEncodingStage(PipelineStage):
    """Prompt (and negative prompt, with guidance) -> embeddings in the DiT's dtype; prompts in
    ``cache`` (a ``PromptCache``, or None) are not encoded again."""

    name = "text_encoding"

    def __init__(self, text_encoder, target_dtype: torch.dtype, device: torch.device,
                 cache: PromptCache | None = None):
        self.text_encoder = text_encoder
        self.target_dtype = target_dtype
        self.device = device
        self.cache = cache

    def verify_input(self, batch: ForwardBatch) -> VerificationResult:
        return VerificationResult(self.name, "input").check(
            "params.prompt", isinstance(batch.params.prompt, str), "must be a string"
        )

    def forward(self, batch: ForwardBatch) -> ForwardBatch:
        p = batch.params
        prompts = [p.prompt]
        if p.do_cfg:
            prompts.append(p.negative_prompt or "")
        embeds = self.encode(prompts, p.max_sequence_length).to(self.device, self.target_dtype)
        batch.prompt_embeds = embeds[:1]
        batch.negative_embeds = embeds[1:] if p.do_cfg else None
        return batch

    def encode(self, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
        """Each prompt's embedding, (len(prompts), L, D): from the cache, the others in one
        encoder call (they share the padded length)."""
        keys = [(text, max_sequence_length) for text in prompts]
        rows = [self.cache.get(key) if self.cache is not None else None for key in keys]
        missing = list(dict.fromkeys(key for key, row in zip(keys, rows) if row is None))
        if missing:
            encoded = dict(zip(missing, self.text_encoder.encode([text for text, _ in missing], max_sequence_length)))
            for key, row in encoded.items():
                if self.cache is not None:
                    self.cache.put(key, row)
            rows = [encoded[key][None] if row is None else row[None] for key, row in zip(keys, rows)]
        else:
            rows = [row[None] for row in rows]
        return torch.cat(rows)

    def verify_output(self, batch: ForwardBatch) -> VerificationResult:
        r = VerificationResult(self.name, "output")
        r.check("prompt_embeds", is_tensor(batch.prompt_embeds, 3), "must be (B, L, D)")
        if batch.params.do_cfg:
            r.check("negative_embeds", is_tensor(batch.negative_embeds, 3), "must be (B, L, D) with guidance")
        return r
