"""The step-distillation trainer (``vidloom.train.distill``) on the tiny model: teacher targets
cached, the adapter trained and checkpointed (a second run resumes at the end instead of training
again), and the file it writes loaded by name with the settings it was trained for."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from vidloom import VideoGenerator
from vidloom.lora import adapter_sampling
from vidloom.train.distill import DistillRecipe, LoraLinear, main
from vidloom.train.recipe import RecipeError, with_overrides


def test_distill_trains_resumes_and_writes_a_loadable_adapter(tiny_wan_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_wan_dir, folder)
    out = folder / "lora" / "fast.safetensors"
    args = ["--model", str(folder), "--run-dir", str(tmp_path / "run"), "--out", str(out), "--threads", "1",
            "--set", "steps=2", "--set", "teacher_steps=3", "--set", "seeds_per_caption=1", "--set", "train_steps=4",
            "--set", "batch=2", "--set", "teacher_batch=30", "--set", "num_frames=5", "--set", "height=32",
            "--set", "width=32", "--set", "rank=2", "--set", "log_every=1"]
    assert main(args) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "distill_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in log)
    summary = json.loads((tmp_path / "run" / "distill_summary.json").read_text())
    assert summary["teacher_videos"] == 60 and summary["steps_reached"] == 4  # the 60 training captions
    first = load_file(str(out))
    assert main(args) == 0  # resumed at its end: nothing trained again, the same adapter written
    second = load_file(str(out))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert any(k.endswith("lora_B.weight") and bool(v.abs().sum() > 0) for k, v in first.items())  # it learned
    assert len((tmp_path / "run" / "distill_log.jsonl").read_text().splitlines()) == 4
    assert adapter_sampling(out) == dict(num_inference_steps=2, guidance_scale=1.0, flow_shift=3.0)
    gen = VideoGenerator.from_pretrained(folder, dtype="fp32", loras=["fast"])
    assert gen.generate("a red circle moving left", height=32, width=32, num_frames=5).params.num_inference_steps == 2


def test_a_lora_linear_starts_as_its_base_layer():
    base = torch.nn.Linear(6, 5)
    layer = LoraLinear(base, rank=2, alpha=4.0)
    x = torch.randn(3, 6)
    assert torch.equal(layer(x), base(x)) and layer.weight is base.weight
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["down", "up"]
    assert with_overrides(DistillRecipe(), ["rank=8", "lr=0.5"]).rank == 8
    with pytest.raises(RecipeError, match="expected KEY=VALUE with a recipe field as KEY"):
        with_overrides(DistillRecipe(), ["targets=blocks."])  # a tuple: not settable
