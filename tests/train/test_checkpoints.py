"""The run directory's checkpoints and caches: safetensors and JSON, never unpickled; a file that is
not what the trainer wrote there is a one-line error naming it, and runs no code."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vidloom.train.__main__ import main as train_main
from vidloom.train.data import build_clips
from vidloom.train.dit import train_dit
from vidloom.train.loop import META_KEY, CheckpointError
from vidloom.train.recipe import MICRO_VAE_ARCH, PRESETS
from vidloom.train.vae import train_decoder, train_vae


class PlantedCode:
    """Unpickling this creates ``marker``: what a planted pickle could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(autouse=True)
def nothing_is_unpickled(monkeypatch):
    """Every test here fails if anything calls torch.load or pickle's loaders (safe or not)."""
    calls = []

    def recorded(name, original, *args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, name, functools.partial(recorded, f"{module.__name__}.{name}",
                                                            getattr(module, name)))
    yield
    assert not calls, f"unpickled with {calls}"


def micro(**changes):
    return dataclasses.replace(PRESETS["micro"](), **changes)


def train(tmp_path, capsys, *options: str) -> tuple[int, str]:
    """The training CLI on the micro preset in ``tmp_path / "run"`` -> (exit code, stderr)."""
    capsys.readouterr()
    code = train_main(["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--preset", "micro",
                       "--set", "i2v_steps=0", *options])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *names: str) -> None:
    """Exit code 2 and, after any progress bars, one line: ``error: ...`` naming ``names``."""
    assert code == 2
    lines = err.splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert not any(line.startswith("error: ") for line in lines[:-1]), err
    for name in names:
        assert name in lines[-1], (name, err)


def vae_checkpoint(tmp_path, capsys):
    """A real VAE checkpoint of the micro preset (one step, then out of time) -> its path."""
    assert train(tmp_path, capsys, "--minutes", "0")[0] == 0
    return tmp_path / "run" / "vae.ckpt.safetensors"


@pytest.mark.parametrize("name", ["vae.pt", "vae.ckpt.safetensors"])
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_planted_pickle_is_refused_without_running_it(tmp_path, capsys, name, writer):
    marker = tmp_path / "PWNED"
    planted = {"model": {}, "step": 0, "total": 20, "x": PlantedCode(marker)}
    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / name
    if writer == "torch.save":
        torch.save(planted, path)
    else:
        path.write_bytes(pickle.dumps(planted))
    code, err = train(tmp_path, capsys, "--minutes", "0")
    assert_one_line_error(code, err, str(path))
    assert not marker.exists()


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path):
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _empty(path):
    path.write_bytes(b"")


def _rewrite(path, drop_tensor=None, record=None, add_tensor=None):
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    if drop_tensor is not None:
        del tensors[next(k for k in tensors if k.startswith(drop_tensor))]
    if add_tensor is not None:
        tensors[add_tensor] = torch.zeros(3)
    if record is not None:
        metadata = {META_KEY: json.dumps(record(json.loads(metadata[META_KEY])))} if record else {}
    save_file(tensors, str(path), metadata=metadata)


def _without(key):
    return lambda record: {k: v for k, v in record.items() if k != key}


def _numpy_state(record, value):
    return {**record, "numpy_rng": {**record["numpy_rng"], "state": {"state": value, "inc": 1}}}


CORRUPTIONS = {
    "truncated": _truncate,
    "garbage": _garbage,
    "empty": _empty,
    "a weight missing": lambda p: _rewrite(p, drop_tensor="model/"),
    "an optimizer moment missing": lambda p: _rewrite(p, drop_tensor="optimizer/"),
    "the RNG state missing": lambda p: _rewrite(p, drop_tensor="rng/torch"),
    "no record": lambda p: _rewrite(p, record=False),
    "the step missing": lambda p: _rewrite(p, record=_without("step")),
    "the numpy RNG state missing": lambda p: _rewrite(p, record=_without("numpy_rng")),
    "the optimizer's groups missing": lambda p: _rewrite(p, record=_without("param_groups")),
    "a step beyond the total": lambda p: _rewrite(p, record=lambda r: {**r, "step": r["total"] + 1}),
    "a negative step": lambda p: _rewrite(p, record=lambda r: {**r, "step": -1}),
    "another phase's": lambda p: _rewrite(p, record=lambda r: {**r, "phase": "dit"}),
    "a bad numpy RNG state": lambda p: _rewrite(p, record=lambda r: {**r, "numpy_rng": {"bit_generator": "x"}}),
    "a numpy RNG state out of range": lambda p: _rewrite(p, record=lambda r: _numpy_state(r, 2**200)),
    "a numpy RNG state not an integer": lambda p: _rewrite(p, record=lambda r: _numpy_state(r, 1.5)),
    "an optimizer key without a name": lambda p: _rewrite(p, add_tensor="optimizer/0"),
    "optimizer state of no parameter": lambda p: _rewrite(p, add_tensor="optimizer/999/exp_avg"),
    "an extra tensor": lambda p: _rewrite(p, add_tensor="model/extra"),
    "optimizer scalars not objects": lambda p: _rewrite(p, record=lambda r: {**r, "optimizer_scalars": {"0": 5}}),
    "a NaN learning rate": lambda p: _rewrite(p, record=lambda r: {
        **r, "param_groups": [{**g, "lr": float("nan")} for g in r["param_groups"]]}),
    "a directory": lambda p: (p.unlink(), p.mkdir()),
    "CUDA generator states misnumbered": lambda p: _rewrite(p, add_tensor="rng/cuda/3"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_checkpoint_the_trainer_did_not_write_is_a_one_line_error_naming_it(tmp_path, capsys, corruption):
    path = vae_checkpoint(tmp_path, capsys)
    CORRUPTIONS[corruption](path)
    code, err = train(tmp_path, capsys, "--minutes", "0")
    assert_one_line_error(code, err, str(path))


def test_a_checkpoint_of_another_preset_or_phase_is_refused_before_anything_is_loaded(tmp_path):
    clips, _ = build_clips(5, 32, 1, seed=0)
    other = micro(vae_steps=2, vae_arch=dict(MICRO_VAE_ARCH, base_dim=4))
    train_vae(other, clips, tmp_path, minutes=0)
    with pytest.raises(CheckpointError, match="another preset") as info:
        train_vae(micro(vae_steps=2), clips, tmp_path)
    assert str(tmp_path / "vae.ckpt.safetensors") in str(info.value)
    shutil.copy(tmp_path / "vae.ckpt.safetensors", tmp_path / "decoder.ckpt.safetensors")
    vae = train_vae(micro(vae_steps=2, vae_arch=other.vae_arch), clips, tmp_path)
    with pytest.raises(CheckpointError, match="written by the 'vae' phase"):
        train_decoder(micro(decoder_steps=2, vae_arch=other.vae_arch), vae, clips, tmp_path)


def test_dit_resume_from_its_safetensors_checkpoint_is_exact(tmp_path):
    recipe = micro(dit_steps=3, dit_batch=2)
    gen = torch.Generator().manual_seed(0)
    latents, table = torch.randn(6, 4, 2, 8, 8, generator=gen), torch.randn(3, 8, 16, generator=gen)
    ids = torch.tensor([0, 1, 0, 1, 0, 1])
    (tmp_path / "whole").mkdir()
    (tmp_path / "pieces").mkdir()
    whole, whole_ema = train_dit(recipe, latents, ids, table, 2, tmp_path / "whole")
    for _ in range(3):  # minutes=0: one step, a checkpoint, stop; the next call resumes
        pieces, pieces_ema = train_dit(recipe, latents, ids, table, 2, tmp_path / "pieces", minutes=0)
    for (n, a), (_, b) in zip(whole.state_dict().items(), pieces.state_dict().items()):
        assert torch.equal(a, b), n
    for n in whole_ema:
        assert torch.equal(whole_ema[n], pieces_ema[n]), n
    with safe_open(str(tmp_path / "pieces" / "dit.ckpt.safetensors"), "pt") as f:
        keys, record = set(f.keys()), json.loads(f.metadata()[META_KEY])
    assert {"rng/torch", "rng/generator"} <= keys and any(k.startswith("ema/") for k in keys)
    assert record["step"] == record["total"] == 3 and record["numpy_rng"]["bit_generator"] == "PCG64"


def _planted_object_array(path, marker):
    np.savez(path, clips=np.array([PlantedCode(marker)], dtype=object), captions=np.array(["a"]))


@pytest.mark.parametrize("plant", ["object array", "garbage", "wrong shape", "a single array", "missing captions",
                                   "a FIFO"])
def test_a_clip_cache_the_trainer_did_not_write_is_refused(tmp_path, capsys, plant):
    marker = tmp_path / "PWNED"
    path = tmp_path / "run" / "data" / "clips_f5_s32_n1_seed0.npz"
    path.parent.mkdir(parents=True)
    if plant == "object array":
        _planted_object_array(path, marker)
    elif plant == "garbage":
        _garbage(path)
    elif plant == "a FIFO":  # np.load would wait on it forever
        os.mkfifo(path)
    elif plant == "a single array":
        with open(path, "wb") as f:
            np.save(f, np.zeros((60, 5, 32, 32, 3), np.uint8))
    elif plant == "missing captions":
        np.savez(path, clips=np.zeros((60, 5, 32, 32, 3), np.uint8))
    else:
        np.savez(path, clips=np.zeros((60, 5, 16, 16, 3), np.uint8), captions=np.array(["a"] * 60))
    code, err = train(tmp_path, capsys, "--minutes", "0")
    assert_one_line_error(code, err, str(path))
    assert not marker.exists()


FAST = ("--set", "vae_steps=1", "--set", "decoder_steps=0", "--set", "dit_steps=1", "--set", "tune_steps=0")


@pytest.mark.parametrize("plant", ["garbage", "wrong shape", "not finite"])
def test_a_latent_cache_the_trainer_did_not_write_is_refused(tmp_path, capsys, plant):
    path = tmp_path / "run" / "latents.safetensors"
    path.parent.mkdir(parents=True)
    if plant == "garbage":
        _garbage(path)
    else:  # the micro preset's 60 clips encode to (60, 4, 2, 8, 8)
        shape = (60, 4, 2, 8, 8) if plant == "not finite" else (60, 16, 2, 8, 8)
        save_file({"latents": torch.full(shape, float("nan") if plant == "not finite" else 0.0)}, str(path))
    code, err = train(tmp_path, capsys, *FAST)
    assert_one_line_error(code, err, str(path))


def test_the_text_encoder_is_never_read_from_a_pickle(tmp_path, capsys):
    assert train(tmp_path, capsys, *FAST)[0] == 0
    folder = tmp_path / "run" / "text" / "text_encoder"
    marker = tmp_path / "PWNED"
    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save({**weights, "x": PlantedCode(marker)}, folder / "pytorch_model.bin")
    code, err = train(tmp_path, capsys, *FAST)
    assert_one_line_error(code, err, str(tmp_path / "run" / "text"))
    assert not marker.exists()
