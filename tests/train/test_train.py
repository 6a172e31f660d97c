"""Training on a micro configuration: the loss goes down, resume is exact, the export loads."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest
import torch

from vidloom import VideoGenerator
from vidloom.train.__main__ import main as train_main
from vidloom.train.data import build_clips
from vidloom.train.dit import sample_sigmas
from vidloom.train.recipe import PRESETS
from vidloom.train.vae import train_vae


def micro(**changes):
    return dataclasses.replace(PRESETS["micro"](), **changes)


def test_clip_dataset_is_deterministic():
    a, ca = build_clips(5, 32, 1, seed=3)
    b, cb = build_clips(5, 32, 1, seed=3)
    assert a.dtype == np.uint8 and a.shape == (60, 5, 32, 32, 3)
    assert np.array_equal(a, b) and ca == cb and "a red square moving left" in ca


def test_vae_loss_goes_down(tmp_path):
    recipe = micro(vae_steps=40, vae_lr=3e-3)
    clips, _ = build_clips(5, 32, 1, seed=0)
    train_vae(recipe, clips, tmp_path)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "vae_log.jsonl").read_text().splitlines()]
    assert len(losses) == 40
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8])


def test_resume_is_exact(tmp_path):
    recipe = micro(vae_steps=4)
    clips, _ = build_clips(5, 32, 1, seed=0)
    whole = train_vae(recipe, clips, tmp_path / "whole")
    for _ in range(4):  # minutes=0: one step, a checkpoint, stop; the next call resumes
        pieces = train_vae(recipe, clips, tmp_path / "pieces", minutes=0)
    for (n, a), (_, b) in zip(whole.state_dict().items(), pieces.state_dict().items()):
        assert torch.equal(a, b), n


def test_timestep_sampling_is_shifted_towards_noise():
    g = torch.Generator().manual_seed(0)
    plain, shifted = sample_sigmas(4000, 1.0, g), sample_sigmas(4000, 3.0, g)
    assert 0 < plain.min() and plain.max() < 1 and shifted.mean() > plain.mean() + 0.1


def test_end_to_end_micro_run_exports_a_folder_both_libraries_load(tmp_path):
    from diffusers import WanPipeline

    assert train_main(["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "model"), "--preset", "micro"]) == 0
    dit_losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "dit_log.jsonl").read_text().splitlines()]
    assert np.mean(dit_losses[-5:]) < np.mean(dit_losses[:5])
    gen = VideoGenerator.from_pretrained(tmp_path / "model", dtype="fp32")
    pipe = WanPipeline.from_pretrained(str(tmp_path / "model"), dtype=torch.float32)
    latents = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(height=32, width=32, num_frames=5, num_inference_steps=3, guidance_scale=4.0)
    ours = gen.generate("a red circle moving left", latents=latents, **kwargs).frames
    ref = pipe(prompt="a red circle moving left", latents=latents.clone(), output_type="np", **kwargs).frames[0]
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= 1e-4


def test_clip_dataset_does_not_depend_on_the_number_of_processes():
    a, ca = build_clips(3, 16, 1, seed=5)
    b, cb = build_clips(3, 16, 1, seed=5, workers=2)
    assert np.array_equal(a, b) and ca == cb


def test_fitting_a_phase_to_a_budget_shortens_it_and_resume_keeps_the_fitted_total(tmp_path):
    from vidloom.train.loop import run_steps

    saved = {}

    def step_fn(step, total):
        time.sleep(0.002)
        return {"loss": torch.tensor(1.0 / (step + 1))}

    def save_fn(step, total):
        saved.update(step=step, total=total)

    # ~2 ms a step: a 0.01-minute budget fits a few hundred of the 100000 steps
    step, total = run_steps(0, 100_000, step_fn, save_fn, tmp_path / "log.jsonl", 10.0, "t", fit_minutes=0.01)
    assert 60 < total < 2000 and step == total and saved == {"step": total, "total": total}
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == total // 10 + (total % 10 > 0)


def test_recipe_overrides_are_typed_and_checked():
    from vidloom.train.__main__ import apply_overrides

    recipe = apply_overrides(PRESETS["micro"](), ["dit_steps=7", "dit_lr=0.5"])
    assert recipe.dit_steps == 7 and recipe.dit_lr == 0.5
    with pytest.raises(SystemExit, match="dit_steps"):
        apply_overrides(recipe, ["no_such_field=1"])


def test_bf16_autocast_trains_with_finite_losses_close_to_fp32(tmp_path):
    recipe = micro(vae_steps=6, vae_lr=3e-3)
    clips, _ = build_clips(5, 32, 1, seed=0)
    train_vae(recipe, clips, tmp_path / "fp32")
    train_vae(recipe, clips, tmp_path / "bf16", autocast=True)
    fp32, bf16 = ([json.loads(line)["loss"] for line in (tmp_path / d / "vae_log.jsonl").read_text().splitlines()]
                  for d in ("fp32", "bf16"))
    assert all(np.isfinite(bf16)) and len(bf16) == 6
    assert np.allclose(bf16, fp32, rtol=0.05)  # the same run, to bf16 rounding of the forward pass
