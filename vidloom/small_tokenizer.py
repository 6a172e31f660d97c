"""A small T5-style tokenizer, trained on the spot from a fixed word list.

The shipped models' tokenizer (``vidloom.train``) and that of the random-weight test folders
(``vidloom.tiny``). Nothing is downloaded; the folder it writes reloads offline through
``AutoTokenizer`` as a ``T5TokenizerFast``.
"""

from __future__ import annotations

from pathlib import Path

COLORS = ("red", "green", "blue", "yellow", "magenta", "white", "cyan", "orange", "black", "gray")
SHAPES = ("circle", "square", "triangle", "star", "ball", "cube", "cat", "dog", "car", "tree")
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "rotating", "jumping", "standing still")


def tokenizer_corpus() -> list[str]:
    lines = [f"a {c} {s} {m}" for c in COLORS for s in SHAPES for m in MOTIONS]
    lines += ["the quick brown fox jumps over the lazy dog", "a video of the sea at sunset, cinematic"]
    return lines


def build_tokenizer(folder: str | Path, vocab_size: int = 256):
    """Train a small Unigram tokenizer with T5's conventions (pad 0, eos 1, unk 2, ``</s>`` appended)
    and save it as a ``T5TokenizerFast`` folder that ``AutoTokenizer`` reloads offline."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz0123456789 ,.!?'-"),
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    fast = T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)
    fast.model_max_length = 512
    fast.save_pretrained(str(folder))
    return fast
