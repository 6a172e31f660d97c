"""The training CLI's refusals: one line, ``error: ...`` naming the option, exit code 2, before any
clip is built or any phase starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vidloom.train.__main__ import apply_overrides
from vidloom.train.__main__ import main as train_main
from vidloom.train.recipe import PRESETS, RecipeError

ROOT = Path(__file__).resolve().parents[2]

# (options after --preset micro, what the message must name); {tmp} is the test's folder
REFUSED = {
    "an int that is not a number": (["--set", "vae_steps=abc"], ["vae_steps", "integer"]),
    "an int given as a float": (["--set", "dit_steps=1.5"], ["dit_steps", "integer"]),
    "a float that is not a number": (["--set", "tune_lr=fast"], ["tune_lr", "number"]),
    "negative steps": (["--set", "vae_steps=-5"], ["vae_steps", "at least 1"]),
    "no VAE steps": (["--set", "vae_steps=0"], ["vae_steps"]),
    "negative fine-tune steps": (["--set", "tune_steps=-1"], ["tune_steps", "at least 0"]),
    "a NaN learning rate": (["--set", "dit_lr=nan"], ["dit_lr", "finite"]),
    "an infinite learning rate": (["--set", "vae_lr=inf"], ["vae_lr"]),
    "a zero learning rate": (["--set", "decoder_lr=0"], ["decoder_lr"]),
    "a negative learning rate": (["--set", "dit_lr=-1e-3"], ["dit_lr"]),
    "a probability above 1": (["--set", "dit_caption_dropout=1.5"], ["dit_caption_dropout", "[0, 1]"]),
    "a NaN probability": (["--set", "i2v_first_frame_prob=nan"], ["i2v_first_frame_prob"]),
    "an EMA decay below 0": (["--set", "dit_ema=-0.1"], ["dit_ema"]),
    "a zero batch": (["--set", "vae_batch=0"], ["vae_batch"]),
    "logging every 0 steps": (["--set", "log_every=0"], ["log_every"]),
    "a negative seed": (["--set", "seed=-1"], ["seed"]),
    "a negative checkpoint interval": (["--set", "checkpoint_minutes=-1"], ["checkpoint_minutes"]),
    "frames the VAE cannot encode": (["--set", "frames=6"], ["frames", "1 + 4"]),
    "VAE clips longer than the clips": (["--set", "vae_frames=9"], ["vae_frames"]),
    "a size the DiT cannot patch": (["--set", "size=30"], ["size", "multiple of 8"]),
    "a crop the VAE cannot encode": (["--set", "vae_crop=6"], ["vae_crop"]),
    "an unknown key": (["--set", "no_such_field=1"], ["no_such_field", "dit_steps"]),
    "a key without a value": (["--set", "vae_steps"], ["vae_steps", "KEY=VALUE"]),
    "image-to-video steps without --out-i2v": (["--set", "i2v_steps=2"], ["--out-i2v"]),
    "a NaN time budget": (["--minutes", "nan"], ["--minutes"]),
    "a negative time budget": (["--minutes", "-1"], ["--minutes"]),
    "a zero fitting budget": (["--fit-vae-minutes", "0"], ["--fit-vae-minutes"]),
    "no threads": (["--threads", "0"], ["--threads"]),
    "an unknown device": (["--device", "bogus"], ["--device", "bogus"]),
    "a run directory that is a file": (["--run-dir", "{tmp}/file"], ["--run-dir", "{tmp}/file"]),
    "a run directory below a file": (["--run-dir", "{tmp}/file/run"], ["--run-dir", "{tmp}/file/run"]),
    "an init folder that does not exist": (["--init", "/nonexistent"], ["--init", "/nonexistent"]),
    "an init folder that is not a model": (["--init", "{tmp}"], ["--init", "transformer"]),
    "an output that is a file": (["--out", "{tmp}/file"], ["--out", "{tmp}/file"]),
    "an output that is the run directory": (["--out", "{tmp}/run"], ["--out", "--run-dir"]),
    "an output that holds the run directory": (["--out", "{tmp}"], ["--out", "--run-dir"]),
    "an output that is some other folder": (["--out", "{tmp}/other"], ["--out", "not an exported model folder"]),
    "an output below a file": (["--out", "{tmp}/file/out"], ["--out", "{tmp}/file"]),
    "an image-to-video output below a file": (["--set", "i2v_steps=2", "--out-i2v", "{tmp}/file/i2v"],
                                              ["--out-i2v", "{tmp}/file"]),
}
if not torch.cuda.is_available():
    REFUSED["a CUDA device on a machine without one"] = (["--device", "cuda"], ["--device", "CUDA"])


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_bad_option_is_a_one_line_error_before_any_phase_starts(tmp_path, capsys, case):
    options, names = REFUSED[case]
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("someone's files")
    argv = ["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--preset", "micro", "--set",
            "i2v_steps=0"]
    code = train_main(argv + [o.format(tmp=tmp_path) for o in options])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for name in names:
        assert name.format(tmp=tmp_path) in err, (name, err)
    assert not (tmp_path / "run" / "data").exists() and not (tmp_path / "run" / "vae_log.jsonl").exists()
    assert (tmp_path / "other" / "notes.txt").is_file()


def test_the_recipe_is_validated_when_it_is_made():
    with pytest.raises(RecipeError, match="dit_lr"):
        PRESETS["micro"]().__class__(dit_lr=float("nan"))
    for preset in PRESETS.values():
        preset()  # the shipped presets are valid
    # checkpoints only at the end and when time runs out: infinite, but not NaN
    assert apply_overrides(PRESETS["micro"](), ["checkpoint_minutes=inf"]).checkpoint_minutes == float("inf")
    with pytest.raises(RecipeError, match="checkpoint_minutes"):
        apply_overrides(PRESETS["micro"](), ["checkpoint_minutes=nan"])


def test_the_module_exits_2_with_the_error_on_stderr_and_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "vidloom.train", "--run-dir", str(tmp_path / "run"), "--out",
                           str(tmp_path / "out"), "--preset", "micro", "--set", "vae_steps=abc"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: vae_steps: expected an integer, got 'abc'"
    assert "Traceback" not in proc.stderr


def _exported_folder(folder: Path, recipe, text_dir: Path) -> Path:
    """An exported folder of ``recipe``'s architectures (random weights), as --init takes it."""
    from vidloom.models.wan_dit import WanDiT, WanDiTConfig
    from vidloom.models.wan_vae import WanVAE, WanVAEConfig
    from vidloom.train.export import export_model, make_text_stack

    make_text_stack(recipe, text_dir)
    dit = WanDiT(WanDiTConfig.from_dict(recipe.dit_arch))
    ema = {n: p.detach() for n, p in dit.named_parameters()}
    return export_model(folder, dit, ema, WanVAE(WanVAEConfig.from_dict(recipe.vae_arch)), text_dir, 3.0)


@pytest.mark.parametrize("case", ["another preset's DiT", "a training.json that is not JSON"])
def test_an_init_folder_that_does_not_fit_is_a_one_line_error(tmp_path, capsys, case):
    import dataclasses

    recipe = PRESETS["micro"]()
    if case == "another preset's DiT":
        recipe = dataclasses.replace(recipe, dit_arch={**recipe.dit_arch, "num_layers": 2})
    init = _exported_folder(tmp_path / "init", recipe, tmp_path / "text")
    if case == "a training.json that is not JSON":
        (init / "training.json").write_text("{not json")
    code = train_main(["--run-dir", str(tmp_path / "run"), "--init", str(init), "--out", str(tmp_path / "out"),
                       "--preset", "micro", "--set", "decoder_steps=0", "--set", "tune_steps=0",
                       "--set", "i2v_steps=0"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines()[-1].startswith("error: ") and "Traceback" not in err, err
    assert str(init / ("transformer" if case == "another preset's DiT" else "training.json")) in err
    assert not (tmp_path / "out").exists()
