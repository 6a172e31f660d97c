"""Prompt encoding against WanPipeline.encode_prompt."""

from __future__ import annotations

import logging

import torch

from vidloom.loader.components import load_component
from vidloom.models.encoders import WanTextEncoder, clean_prompt


def make_encoder(folder):
    tok = load_component(folder, "tokenizer", ["transformers", "T5TokenizerFast"], torch.device("cpu"), None)
    te = load_component(folder, "text_encoder", ["transformers", "UMT5EncoderModel"], torch.device("cpu"),
                        torch.float32)
    return WanTextEncoder(tok, te)


def test_embeddings_equal_reference(tiny_wan_dir, tiny_wan_pipe):
    enc = make_encoder(tiny_wan_dir)
    prompts = ["a red  circle &amp; a cat", "  "]
    ours = enc.encode(prompts, 40)
    ref = torch.cat([tiny_wan_pipe.encode_prompt(p, do_classifier_free_guidance=False, max_sequence_length=40)[0]
                     for p in prompts])
    assert ours.shape == ref.shape == (2, 40, 16)
    # both prompts run as one batch here, one at a time in the reference: fp32 rounding only
    assert ((ours - ref).norm() / ref.norm()).item() <= 1e-6
    n = enc.token_count(prompts[0])
    assert ours[0, n:].abs().sum() == 0 and ours[0, :n].abs().sum() > 0


def test_long_prompt_is_truncated_with_warning(tiny_wan_dir, caplog):
    enc = make_encoder(tiny_wan_dir)
    long_prompt = " ".join(["a red circle moving left"] * 20)
    with caplog.at_level(logging.WARNING, logger="vidloom.models.encoders"):
        out = enc.encode([long_prompt], 16)
    assert out.shape == (1, 16, 16)
    assert any("truncated" in r.message for r in caplog.records)


def test_clean_prompt():
    assert clean_prompt("  a&amp;b \n\t c ") == "a&b c"
