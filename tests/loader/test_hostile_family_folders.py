"""Hostile Wan2.1 I2V + CLIP and Wan2.2 TI2V folders: an image processor whose sizes, flags or
normalisation would not give the image encoder its input, a VAE config that does not take RGB
frames, and transformers components that name custom code (``auto_map``). Each is a one-line
ModelLoadError naming the file and the field before any component's weights are read."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.parity.test_i2v_parity import build_i2v_folder
from tests.parity.test_ti2v_parity import build_ti2v_folder
from vidloom import ModelLoadError, VideoGenerator

from .test_hostile_folders import no_loading  # noqa: F401 - a fixture


@pytest.fixture(scope="module")
def i2v_source(tiny_wan_pipe, tmp_path_factory):
    return build_i2v_folder(tiny_wan_pipe, tmp_path_factory.mktemp("i2v"))


@pytest.fixture(scope="module")
def ti2v_source(tiny_wan_pipe, tmp_path_factory):
    return build_ti2v_folder(tiny_wan_pipe, tmp_path_factory.mktemp("ti2v"))


@pytest.fixture
def i2v(i2v_source, tmp_path):
    shutil.copytree(i2v_source, tmp_path / "i2v")
    return tmp_path / "i2v"


def edit_json(path, change):
    """``change`` edits the parsed object in place (its return value is ignored)."""
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def expect_one_line_error(folder, match, file_part):
    with pytest.raises(ModelLoadError, match=match) as err:
        VideoGenerator.from_pretrained(folder, dtype="fp32")
    assert file_part in (err.value.file or ""), err.value
    assert "\n" not in str(err.value), str(err.value)
    return err.value


def picture(seed: int, w: int = 70, h: int = 50):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


# ----------------------------------------------------------------------------- image processor

PROCESSOR = "image_processor/preprocessor_config.json"


@pytest.mark.parametrize("change,match", [
    # R3-B6: bounded before anything is resized
    ({"crop_size": {"height": 30000, "width": 30000}, "size": {"shortest_edge": 30000}},
     r"size.shortest_edge: got 30000 \(allowed: an integer in 1..8192\)"),
    ({"size": {"shortest_edge": 10**9}}, r"size.shortest_edge: got 1000000000 \(allowed: an integer in 1..8192\)"),
    ({"crop_size": 10**6}, r"crop_size: got 1000000 \(allowed: an integer in 1..8192\)"),
    # in bounds, but not the encoder's 32 px
    ({"crop_size": {"height": 40, "width": 40}}, r'crop_size: \{"height": 40, "width": 40\} is not the image '
     r'encoder\'s image_size 32 \(allowed: \{"height": 32, "width": 32\}\)'),
    ({"crop_size": {"height": 32, "width": 48}}, "crop_size: .* is not the image encoder's image_size 32"),
    ({"size": {"shortest_edge": 4000}}, r'size: \{"shortest_edge": 4000\}: the resize before the 32 px center crop '
     r'must cover it and exceed it at most 2x \(allowed: \{"shortest_edge": 32..64\}\)'),
    ({"size": {"shortest_edge": 16}}, "size: .* must cover it"),
    ({"size": {"longest_edge": 32}}, r'size: got \{\'longest_edge\': 32\} \(allowed: \{"shortest_edge": n\} or'),
    # the flags: an image that would not reach the encoder's size fails now, not per request
    ({"do_center_crop": False}, r'size: \{"shortest_edge": 32\} without a center crop does not make every image '
     r'32x32 .*allowed: do_resize true with size \{"height": 32, "width": 32\}, or do_center_crop true'),
    ({"do_center_crop": False, "do_resize": False}, "do_resize: false with do_center_crop false: images would reach"),
    ({"do_center_crop": "yes"}, r"do_center_crop: got 'yes' \(allowed: true or false\)"),
    ({"do_resize": 1}, r"do_resize: got 1 \(allowed: true or false\)"),
    # normalisation: no division by zero, no NaN, one value per RGB channel
    ({"image_std": 0}, r"image_std: got 0: the pixels are divided by it \(allowed: numbers > 0\)"),
    ({"image_std": [0.3, 0.0, 0.3]}, "image_std: got .*divided by it"),
    ({"image_std": [0.3, 0.3]}, r"image_std: got \[0.3, 0.3\] \(allowed: 3 finite numbers, one per RGB channel\)"),
    ({"image_mean": [float("nan"), 0.5, 0.5]}, "image_mean: got \\[nan, 0.5, 0.5\\] \\(allowed: 3 finite numbers"),
    ({"image_std": [float("inf")] * 3}, "image_std: got \\[inf, inf, inf\\]"),
    ({"image_mean": "0.5"}, "image_mean: got '0.5'"),
    ({"rescale_factor": 0}, r"rescale_factor: got 0 \(allowed: a finite number > 0"),
    ({"resample": 99}, r"resample: got 99 \(allowed: a PIL filter number, 0..5"),
])
def test_image_processor_is_checked_against_the_encoder_at_load(i2v, no_loading, change, match):
    edit_json(i2v / PROCESSOR, lambda d: d.update(change))
    expect_one_line_error(i2v, match, PROCESSOR)


@pytest.mark.parametrize("key,match", [
    # a CLIP processor then takes transformers' default 224 px crop, not the encoder's 32
    ("crop_size", r'crop_size: \{"height": 224, "width": 224\} is not the image encoder\'s image_size 32'),
    ("image_processor_type", "image_processor_type: got None"),
])
def test_a_missing_processor_field_takes_the_default_transformers_would(i2v, no_loading, key, match):
    edit_json(i2v / PROCESSOR, lambda d: d.pop(key))
    expect_one_line_error(i2v, match, PROCESSOR)


def test_a_processor_of_another_type_states_its_fields(i2v, no_loading):
    edit_json(i2v / PROCESSOR, lambda d: (d.update(image_processor_type="SiglipImageProcessor"),
                                          d.pop("do_center_crop")))
    expect_one_line_error(i2v, "do_center_crop: missing, and a 'SiglipImageProcessor' has no default", PROCESSOR)


def test_the_clip_defaults_are_transformers_own():
    """A field the file leaves out is checked at the value transformers' CLIP processor takes."""
    import transformers

    from vidloom.loader.components import CLIP_PROCESSOR_DEFAULTS

    for name, value in CLIP_PROCESSOR_DEFAULTS.items():
        assert getattr(transformers.CLIPImageProcessorPil, name) == value, name


@pytest.mark.parametrize("change", [
    {"do_center_crop": False, "size": {"height": 32, "width": 32}},  # a resize to the encoder's size
    {"do_resize": False},  # the center crop alone (pads a small image) gives 32 x 32
    {"size": {"shortest_edge": 64}, "image_std": 0.25, "image_mean": 0.5},  # resize, then crop; one value per channel
])
def test_processors_that_give_the_encoder_its_size_still_work(i2v, change):
    """Guards the checks above from refusing a processor that works (these load before the change too)."""
    edit_json(i2v / PROCESSOR, lambda d: d.update(change))
    gen = VideoGenerator.from_pretrained(i2v, dtype="fp32")
    frames = gen.generate("a cat", image=picture(1), height=32, width=48, num_frames=5, num_inference_steps=2,
                          seed=1).frames
    assert frames.shape == (5, 32, 48, 3) and np.isfinite(frames).all()


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


# ----------------------------------------------------------------------------- custom code

EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import CLIPImageProcessor, PreTrainedTokenizerFast
class EvilProcessor(CLIPImageProcessor):
    pass
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


@pytest.mark.parametrize("component,file,auto_map,own_class", [
    ("image_processor", "preprocessor_config.json", {"AutoImageProcessor": "evil.EvilProcessor"},
     {"image_processor_type": "EvilProcessor"}),
    ("image_processor", "preprocessor_config.json", {"AutoImageProcessor": "evil.EvilProcessor"}, {}),
    ("tokenizer", "tokenizer_config.json", {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]},
     {"tokenizer_class": "EvilTokenizer"}),
    ("tokenizer", "tokenizer_config.json", {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}, {}),
    ("image_encoder", "config.json", {"AutoModel": "evil.EvilModel"}, {}),
    ("text_encoder", "config.json", {"AutoModel": "evil.EvilModel"}, {}),
])
def test_auto_map_is_refused_and_its_code_never_runs(i2v, tmp_path, no_loading, component, file, auto_map, own_class):
    """With the folder's class (own_class) or the transformers class kept, auto_map is refused at
    once: no prompt, no traceback, and the folder's .py file never runs."""
    marker = tmp_path / "MARKER"
    for name in ("image_processor", "tokenizer", "image_encoder", "text_encoder"):
        (i2v / name / "evil.py").write_text(EVIL.format(marker=str(marker)))
    edit_json(i2v / component / file, lambda d: d.update(auto_map=auto_map, **own_class))
    expect_one_line_error(i2v, r"auto_map names custom code \(.*evil.*\), which vidloom never runs \(allowed: no "
                          r"auto_map", f"{component}/{file}")
    assert not marker.exists()


def test_every_transformers_load_passes_trust_remote_code_false(i2v, monkeypatch):
    """The Auto classes and the model classes are told never to run a folder's code (no prompt on
    a terminal), also when the plan's refusal is not what stops it."""
    import transformers

    seen = []
    for cls_name in ("AutoTokenizer", "AutoImageProcessor", "UMT5EncoderModel", "CLIPVisionModel"):
        cls = getattr(transformers, cls_name)
        original = cls.from_pretrained.__func__

        def checked(klass, *args, _original=original, _name=cls_name, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code", "not passed")))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(checked))
    VideoGenerator.from_pretrained(i2v, dtype="fp32")
    assert sorted(seen) == [("AutoImageProcessor", False), ("AutoTokenizer", False), ("CLIPVisionModel", False),
                            ("UMT5EncoderModel", False)]


def test_a_library_error_is_quoted_on_one_line(i2v, monkeypatch):
    """transformers' messages run over several lines (its custom-code refusal has three): the
    ModelLoadError quoting one stays one line, as the CLI and the server print it."""
    import transformers

    def fail(*args, **kwargs):
        raise ValueError("The repository contains custom code.\n You can inspect it at ...\nPlease pass the argument")

    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", fail)
    err = expect_one_line_error(i2v, "image processor failed to load \\(ValueError: The repository contains custom "
                                "code. You can inspect it at ... Please pass the argument\\)", "image_processor")
    assert err.file.endswith("image_processor")
