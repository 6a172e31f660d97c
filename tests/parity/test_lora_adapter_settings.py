"""Adapters a model folder ships (``lora/<name>.safetensors``, given by name) and the request
settings an adapter was trained for (``vidloom_sampling`` in its metadata: a distilled adapter's
steps and guidance), applied to the requests that use it and do not set them. The file the
distillation trainer writes (``vidloom.train.distill``) is an ordinary diffusers/PEFT adapter:
diffusers' ``load_lora_weights`` gives the same video as vidloom, fp32 <= 1e-4."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vidloom import VideoGenerator
from vidloom.lora import LoraError, adapter_sampling, folder_adapters, resolve_lora
from vidloom.serve.requests import parse
from vidloom.train.distill import DistillRecipe, add_lora, lora_state, write_adapter

from ..numerics import rel_err
from .test_generate_parity import FP32_RTOL, SIZE, diffusers_pipe, initial_latents, reference_frames

PROMPT = "a red circle moving left"


@pytest.fixture(scope="module")
def folder_with_adapter(tiny_wan_dir, tmp_path_factory):
    """The tiny folder with ``lora/fast.safetensors``: an adapter as the trainer writes it (random
    non-zero factors on every targeted layer), trained, it says, for 2 steps without guidance."""
    from vidloom.loader.weights import load_model
    from vidloom.models.wan_dit import WanDiT

    folder = tmp_path_factory.mktemp("with_lora") / "model"
    shutil.copytree(tiny_wan_dir, folder)
    recipe = DistillRecipe(steps=2, rank=4, alpha=8.0)
    dit = load_model(WanDiT, folder / "transformer")
    adapted = add_lora(dit, recipe)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in adapted.values():
            layer.up.copy_(0.2 * torch.randn(layer.up.shape, generator=g))
    write_adapter(folder / "lora" / "fast.safetensors", lora_state(adapted), recipe, shift=3.0)
    return folder


def test_the_trainers_file_is_a_diffusers_adapter_equal_to_vidloom(folder_with_adapter):
    file = folder_with_adapter / "lora" / "fast.safetensors"
    pipe = diffusers_pipe(folder_with_adapter, torch.float32, "cpu")
    pipe.load_lora_weights(str(file), adapter_name="fast")
    expected = reference_frames(pipe, PROMPT, "", 2, 1.0, initial_latents())
    gen = VideoGenerator.from_pretrained(folder_with_adapter, dtype="fp32", loras=["fast"])
    frames = gen.generate(PROMPT, latents=initial_latents(), **SIZE).frames  # 2 steps, guidance 1: the file's
    assert rel_err(frames, expected) <= FP32_RTOL
    plain = VideoGenerator.from_pretrained(folder_with_adapter, dtype="fp32")
    assert rel_err(plain.generate(PROMPT, latents=initial_latents(), num_inference_steps=2, guidance_scale=1.0,
                                  **SIZE).frames, expected) > 1e-3  # the adapter changes the video


def test_a_merged_adapters_settings_apply_where_the_request_gives_none(folder_with_adapter):
    assert folder_adapters(folder_with_adapter) == {"fast": folder_with_adapter / "lora" / "fast.safetensors"}
    assert adapter_sampling(folder_with_adapter / "lora" / "fast.safetensors") == dict(
        num_inference_steps=2, guidance_scale=1.0, flow_shift=3.0)
    gen = VideoGenerator.from_pretrained(folder_with_adapter, dtype="fp32", loras=[("fast", 1.0)])
    assert gen.config.loras == ((str(folder_with_adapter / "lora" / "fast.safetensors"), 1.0),)
    out = gen.generate(PROMPT, **SIZE)
    assert (out.params.num_inference_steps, out.params.guidance_scale, out.params.flow_shift) == (2, 1.0, 3.0)
    out = gen.generate(PROMPT, num_inference_steps=3, guidance_scale=2.0, **SIZE)  # what the request gives wins
    assert (out.params.num_inference_steps, out.params.guidance_scale) == (3, 2.0)


def test_an_unmerged_adapters_settings_apply_to_the_requests_naming_it(folder_with_adapter):
    gen = VideoGenerator.from_pretrained(folder_with_adapter, dtype="fp32")
    gen.load_lora("fast")  # by name: the folder's adapter
    named = gen.generate(PROMPT, lora=["fast"], **SIZE)
    assert (named.params.num_inference_steps, named.params.guidance_scale) == (2, 1.0)
    as_dict = gen.generate(PROMPT, lora=[{"name": "fast", "scale": 1.0}], **SIZE)
    assert (as_dict.params.num_inference_steps, as_dict.params.guidance_scale) == (2, 1.0)
    plain = gen.generate(PROMPT, **SIZE)
    assert (plain.params.num_inference_steps, plain.params.guidance_scale) == (50, 5.0)  # SamplingParams' own
    gen.load_lora("fast")  # the same file again: nothing changes
    with pytest.raises(ValueError, match="an adapter named 'fast' is registered already"):
        gen.load_lora(folder_with_adapter / "lora" / "fast.safetensors", name="fast", expert="transformer_2")
    merged = VideoGenerator.from_pretrained(folder_with_adapter, dtype="fp32", loras=["fast"])
    assert rel_err(named.frames, merged.generate(PROMPT, **SIZE).frames) <= 1e-4


def test_names_and_settings_are_checked(folder_with_adapter, tmp_path):
    with pytest.raises(ValueError, match=r"loras: no LoRA file at slow, nor an adapter of the model folder \(fast\)"):
        VideoGenerator.from_pretrained(folder_with_adapter, loras=["slow"])
    with pytest.raises(LoraError, match="no LoRA file at fast$"):
        resolve_lora("fast", tmp_path)  # a folder without adapters
    tensors = {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 8),
               "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(8, 2)}
    for bad, needle in (("{", "is not JSON"), ('{"seed": 3}', "fields among"), ('[4]', "fields among"),
                        ('{"num_inference_steps": 2.5}', "expected an integer in 1..1000"),
                        ('{"guidance_scale": true}', "expected a number"),
                        ('{"flow_shift": 0}', r"expected a number in 0.001..1000")):
        path = tmp_path / "bad.safetensors"
        save_file(tensors, str(path), metadata={"vidloom_sampling": bad})
        with pytest.raises(LoraError, match=needle):
            adapter_sampling(path)


def test_the_server_applies_an_adapters_settings_to_requests_naming_it():
    defaults = {"num_inference_steps": 20, "guidance_scale": 3.0, "height": 64}
    adapters = {"fast": {"num_inference_steps": 4, "guidance_scale": 1.0}}
    named = parse({"prompt": "a cat", "lora": json.dumps([{"name": "fast"}])}, "m", defaults, adapters).fields
    assert (named["num_inference_steps"], named["guidance_scale"], named["height"]) == (4, 1.0, 64)
    own = parse({"prompt": "a cat", "lora": [{"name": "fast"}], "num_inference_steps": 8}, "m", defaults,
                adapters).fields
    assert own["num_inference_steps"] == 8
    assert parse({"prompt": "a cat"}, "m", defaults, adapters).fields["num_inference_steps"] == 20


def test_the_cli_takes_an_adapter_by_name_with_its_settings(folder_with_adapter, tmp_path):
    from vidloom.cli import main as cli_main

    args = ["generate", "--model", str(folder_with_adapter), "--prompt", PROMPT, "--height", "32", "--width", "48",
            "--num-frames", "9", "--seed", "4", "--dtype", "fp32", "--quiet", "--lora", "fast"]
    assert cli_main(args + ["--output", str(tmp_path / "a.npy")]) == 0
    gen = VideoGenerator.from_pretrained(folder_with_adapter, dtype="fp32", loras=["fast"])
    expected = gen.generate(PROMPT, height=32, width=48, num_frames=9, seed=4).frames
    assert rel_err(np.load(tmp_path / "a.npy"), expected) <= 1e-6
