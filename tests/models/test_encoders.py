"""Prompt encoding against WanPipeline.encode_prompt."""

from __future__ import annotations

import logging

import pytest
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


def _clip_folder(folder, cls_name="CLIPVisionModelWithProjection"):
    import transformers
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=20, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    model = getattr(transformers, cls_name)(config)
    model.save_pretrained(str(folder / "image_encoder"))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        str(folder / "image_processor"))
    return model


@pytest.mark.parametrize("cls_name", ["CLIPVisionModel", "CLIPVisionModelWithProjection"])
def test_image_tokens_equal_the_reference(tmp_path, cls_name):
    """The penultimate hidden states, as diffusers' WanImageToVideoPipeline.encode_image takes them,
    through the loader's planner (safetensors only, layer count checked) and the Auto processor."""
    import numpy as np
    from PIL import Image
    from transformers import CLIPImageProcessor

    from vidloom.models.encoders import WanImageEncoder

    ref = _clip_folder(tmp_path, cls_name).eval()
    cpu = torch.device("cpu")
    encoder = load_component(tmp_path, "image_encoder", ["transformers", cls_name], cpu, torch.float32)
    processor = load_component(tmp_path, "image_processor", ["transformers", "CLIPImageProcessor"], cpu, None)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (37, 50, 3), dtype=np.uint8), "RGB")
    ours = WanImageEncoder(processor, encoder).encode([image])
    pixels = CLIPImageProcessor.from_pretrained(str(tmp_path / "image_processor"))(images=image, return_tensors="pt")
    with torch.no_grad():
        expected = ref(**pixels, output_hidden_states=True).hidden_states[-2]
    assert ours.shape == expected.shape == (1, 17, 20)  # class token + 4 x 4 patches
    assert torch.equal(ours, expected)


def test_image_encoder_layer_count_is_checked_before_building(tmp_path):
    import json

    from vidloom import ModelLoadError

    _clip_folder(tmp_path)
    path = tmp_path / "image_encoder" / "config.json"
    config = json.loads(path.read_text())
    for value, needle in ((10**7, "num_hidden_layers: must be an integer in 1..256"),
                          (3, "implies 3 of 'encoder.layers.N.'")):
        path.write_text(json.dumps(dict(config, num_hidden_layers=value)))
        with pytest.raises(ModelLoadError, match=needle):
            load_component(tmp_path, "image_encoder", ["transformers", "CLIPVisionModelWithProjection"],
                           torch.device("cpu"), torch.float32)
