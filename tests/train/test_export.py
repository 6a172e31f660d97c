"""The export of a trained model: the files it writes, and what it imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vidloom.default_model import DEFAULT_I2V_MODEL_DIR, DEFAULT_MODEL_DIR
from vidloom.models.wan_dit import WanDiT, WanDiTConfig
from vidloom.models.wan_vae import WanVAE, WanVAEConfig
from vidloom.tiny import TINY_TRANSFORMER, TINY_VAE
from vidloom.train.export import export_model


@pytest.mark.parametrize("shipped,expand", [(DEFAULT_MODEL_DIR, False), (DEFAULT_I2V_MODEL_DIR, True)],
                         ids=["t2v", "ti2v"])
def test_export_writes_the_shipped_models_index_and_scheduler_config(tmp_path, shipped, expand):
    text = tmp_path / "text"  # the export copies the run's text stack as it is
    for part in ("tokenizer", "text_encoder"):
        (text / part).mkdir(parents=True)
        (text / part / "stub.txt").write_text(part)
    torch.manual_seed(0)
    dit = WanDiT(WanDiTConfig.from_dict(TINY_TRANSFORMER))
    out = export_model(tmp_path / "model", dit, dit.state_dict(), WanVAE(WanVAEConfig.from_dict(TINY_VAE)), text,
                       flow_shift=3.0, expand_timesteps=expand)
    for name in ("model_index.json", "scheduler/scheduler_config.json"):
        assert (out / name).read_bytes() == (shipped / name).read_bytes(), name
    assert (out / "tokenizer" / "stub.txt").read_text() == "tokenizer"
    assert not (tmp_path / "model.tmp").exists()


def test_the_export_path_does_not_import_the_test_folder_builder():
    """vidloom.tiny builds random test folders; training and exporting the shipped models, the CLI
    and the demo must not need it."""
    code = ("import sys, vidloom.train.__main__, vidloom.train.export, vidloom.cli, vidloom.demo; "
            "assert 'vidloom.tiny' not in sys.modules, 'vidloom.tiny was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
