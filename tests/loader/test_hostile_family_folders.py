"""Hostile Wan2.2 TI2V folders: a VAE config that does not take RGB frames is a one-line
ModelLoadError naming the file and the field before any component's weights are read."""

from __future__ import annotations

import json
import shutil

import pytest

import vidloom.generator as generator_mod
from tests.parity.test_ti2v_parity import build_ti2v_folder
from vidloom import ModelLoadError, VideoGenerator


@pytest.fixture(scope="module")
def ti2v_source(tiny_wan_pipe, tmp_path_factory):
    return build_ti2v_folder(tiny_wan_pipe, tmp_path_factory.mktemp("ti2v"))


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("component weights were loaded before the error")

    monkeypatch.setattr(generator_mod, "_load_components", refuse)


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def expect_one_line_error(folder, match, file_part):
    with pytest.raises(ModelLoadError, match=match) as err:
        VideoGenerator.from_pretrained(folder, dtype="fp32")
    assert file_part in (err.value.file or ""), err.value
    assert "\n" not in str(err.value), str(err.value)
    return err.value


# ----------------------------------------------------------------------------- VAE channels


@pytest.mark.parametrize("change,match", [
    # the Wan2.2 VAE's 12 channels are RGB in 2x2 patches: without the patch size they are 12-channel frames
    ({"patch_size": None}, r"patch_size: null makes in_channels=12 frames of 12 channels, but the VAE takes and "
     r"gives RGB frames \(allowed: 2, for in_channels = 3 x patch_size\^2\)"),
    ({"patch_size": 1}, "patch_size: 1 makes in_channels=12 frames of 12 channels"),
    ({"in_channels": 16}, r"in_channels: 16 is not 3 x patch_size\^2 = 12 .*\(allowed: 12\)"),
    ({"out_channels": 48, "in_channels": 48}, r"patch_size: 2 makes in_channels=48 frames of 12 channels.*"
     r"\(allowed: 4,"),
])
def test_ti2v_vae_that_does_not_take_rgb_fails_at_load(ti2v_source, tmp_path, no_loading, change, match):
    folder = tmp_path / "ti2v"
    shutil.copytree(ti2v_source, folder)
    edit_json(folder / "vae" / "config.json", lambda d: d.update(change))
    expect_one_line_error(folder, match, "vae/config.json")
