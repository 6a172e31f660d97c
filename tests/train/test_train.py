"""Training on a micro configuration: the loss goes down, resume is exact, the export loads."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from vidloom import VideoGenerator
from vidloom.train.__main__ import main as train_main
from vidloom.train.data import build_clips
from vidloom.train.dit import sample_sigmas
from vidloom.train.recipe import PRESETS, RecipeError
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


def test_end_to_end_micro_run_exports_folders_both_libraries_load(tmp_path):
    from diffusers import WanImageToVideoPipeline, WanPipeline

    run, model, i2v = tmp_path / "run", tmp_path / "model", tmp_path / "i2v"
    assert train_main(["--run-dir", str(run), "--out", str(model), "--out-i2v", str(i2v), "--preset", "micro"]) == 0
    for phase, steps in (("dit", 30), ("decoder", 4), ("tune", 5), ("i2v", 6)):
        losses = [json.loads(line)["loss"] for line in (run / f"{phase}_log.jsonl").read_text().splitlines()]
        assert len(losses) == steps and all(np.isfinite(losses)), phase
    dit_losses = [json.loads(line)["loss"] for line in (run / "dit_log.jsonl").read_text().splitlines()]
    assert np.mean(dit_losses[-5:]) < np.mean(dit_losses[:5])
    assert len(json.loads((run / "summary.json").read_text())["frame_psnr_db"]) == 5
    latents = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(height=32, width=32, num_frames=5, num_inference_steps=3, guidance_scale=4.0)
    prompt = "a red circle moving left"

    gen = VideoGenerator.from_pretrained(model, dtype="fp32")
    pipe = WanPipeline.from_pretrained(str(model), dtype=torch.float32)
    ours = gen.generate(prompt, latents=latents, **kwargs).frames
    ref = pipe(prompt=prompt, latents=latents.clone(), output_type="np", **kwargs).frames[0]
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= 1e-4

    assert json.loads((i2v / "model_index.json").read_text())["expand_timesteps"] is True
    gen = VideoGenerator.from_pretrained(i2v, dtype="fp32")
    parts = WanPipeline.from_pretrained(str(i2v), dtype=torch.float32).components
    pipe = WanImageToVideoPipeline(**{k: parts[k] for k in ("tokenizer", "text_encoder", "transformer", "vae",
                                                             "scheduler")}, expand_timesteps=True)
    image = (build_clips(5, 32, 1, seed=9)[0][0, 0]).copy()
    ours = gen.generate(prompt, image=image, latents=latents, **kwargs).frames
    ref = pipe(image=Image.fromarray(image), prompt=prompt, latents=latents.clone(), output_type="np",
               **kwargs).frames[0]
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= 1e-4


def test_a_run_from_an_exported_folder_changes_only_the_decoder_and_keeps_the_dit(tmp_path):
    from vidloom.loader.weights import load_model
    from vidloom.models.wan_dit import WanDiT
    from vidloom.models.wan_vae import WanVAE

    first = tmp_path / "first"
    assert train_main(["--run-dir", str(tmp_path / "run1"), "--out", str(first), "--preset", "micro",
                       "--set", "decoder_steps=0", "--set", "tune_steps=0", "--set", "i2v_steps=0"]) == 0
    second = tmp_path / "second"
    assert train_main(["--run-dir", str(tmp_path / "run2"), "--init", str(first), "--out", str(second),
                       "--preset", "micro", "--set", "i2v_steps=0", "--set", "tune_steps=0",
                       "--set", "decoder_lr=0.01"]) == 0
    a, b = (load_model(WanVAE, f / "vae") for f in (first, second))
    assert a.config == b.config  # the latent statistics kept
    changed = {n for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()) if not torch.equal(x, y)}
    assert changed and all(n.startswith(("decoder.", "post_quant_conv.")) for n in changed)
    assert any(n.startswith("decoder.") for n in changed)
    for (n, x), (_, y) in zip(*(load_model(WanDiT, f / "transformer").state_dict().items() for f in (first, second))):
        assert torch.equal(x, y), n
    assert (first / "text_encoder" / "model.safetensors").read_bytes() == (
        second / "text_encoder" / "model.safetensors").read_bytes()


def test_a_given_first_frame_is_kept_out_of_the_loss_and_gets_timestep_zero():
    from vidloom.models.wan_dit import WanDiT, WanDiTConfig
    from vidloom.train.dit import flow_matching_loss

    torch.manual_seed(0)
    dit = WanDiT(WanDiTConfig.from_dict(PRESETS["micro"]().dit_arch)).eval()
    x0, noise = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 4, 3, 8, 8)
    context, sigmas = torch.randn(2, 6, 16), torch.tensor([0.7, 0.4])
    given = torch.tensor([True, False])
    loss = flow_matching_loss(dit, x0, context, sigmas, noise, given)
    other_noise = noise.clone()
    other_noise[0, :, 0] += 1.0  # the given frame's noise is never used
    assert torch.equal(flow_matching_loss(dit, x0, context, sigmas, other_noise, given), loss)
    other_noise = noise.clone()
    other_noise[1, :, 0] += 1.0  # but the row without a given frame uses it
    assert not torch.equal(flow_matching_loss(dit, x0, context, sigmas, other_noise, given), loss)
    # the model input: the clean frame, its tokens at timestep 0, the rest at sigma * 1000
    seen = {}
    dit.register_forward_pre_hook(lambda m, args: seen.update(x=args[0], t=args[1]))
    flow_matching_loss(dit, x0, context, sigmas, noise, given)
    assert torch.equal(seen["x"][0, :, 0], x0[0, :, 0])
    tokens = 4 * 4  # a frame's 8 x 8 latents in 2 x 2 patches
    assert torch.all(seen["t"][0, :tokens] == 0) and torch.allclose(seen["t"][0, tokens:], torch.tensor(700.0))
    assert torch.allclose(seen["t"][1], torch.tensor(400.0))
    assert torch.equal(flow_matching_loss(dit, x0, context, sigmas, noise, torch.tensor([False, False])),
                       flow_matching_loss(dit, x0, context, sigmas, noise))
    # a first-latent weight: frame 0's error counts that many times, the mean is over the weights
    with torch.no_grad():
        err = (dit(x0 * 0.3 + noise * 0.7, torch.full((2,), 700.0), context) - (noise - x0)).pow(2)
    sigmas = torch.tensor([0.7, 0.7])
    per_frame = err.mean(dim=(0, 1, 3, 4))
    expected = (4 * per_frame[0] + per_frame[1:].sum()) / 6
    with torch.no_grad():
        assert torch.allclose(flow_matching_loss(dit, x0, context, sigmas, noise, first_latent_weight=4.0), expected)


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
    with pytest.raises(RecipeError, match="dit_steps"):
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
