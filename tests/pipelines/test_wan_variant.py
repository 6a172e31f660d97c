"""The Wan variant is one frozen record decided from the folder: ``model_index.json`` gives
``from_index``, the components' configs complete it in ``loader.plan.plan_folder``, and the
pipeline, the request limits and ``vidloom info`` all read that record."""

from __future__ import annotations

import dataclasses

import pytest

from vidloom import ModelLoadError
from vidloom.config import EngineConfig
from vidloom.loader.plan import plan_folder
from vidloom.pipelines.stages.denoising import ConcatCondition, GivenFrames, ModelInput
from vidloom.pipelines.wan_variant import ImageInput, WanVariant

T2V = {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]}


@pytest.mark.parametrize("index, image_pipeline, kind, components", [
    (T2V, False, "t2v", ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")),
    (T2V, True, "i2v", ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")),
    ({**T2V, "expand_timesteps": True}, False, "ti2v", ("tokenizer", "text_encoder", "transformer", "vae",
                                                        "scheduler")),
    ({**T2V, "boundary_ratio": 0.9, "transformer_2": ["diffusers", "WanTransformer3DModel"]}, False, "two_expert",
     ("tokenizer", "text_encoder", "transformer", "vae", "scheduler", "transformer_2")),
    ({**T2V, "boundary_ratio": 0.9, "transformer": [None, None], "transformer_2": ["diffusers", "X"]}, True,
     "low_noise_only", ("tokenizer", "text_encoder", "vae", "scheduler", "transformer_2")),
])
def test_the_index_decides_the_kind_and_the_components(index, image_pipeline, kind, components):
    variant = WanVariant.from_index(index, "model_index.json", image_pipeline)
    assert variant.kind == kind
    assert variant.components() == components
    assert variant.optional_components() == (("image_encoder", "image_processor") if image_pipeline else ())
    with pytest.raises(dataclasses.FrozenInstanceError):
        variant.boundary_ratio = 0.5


@pytest.mark.parametrize("index, message", [
    ({**T2V, "boundary_ratio": 2}, "boundary_ratio: must be a number in"),
    ({**T2V, "boundary_ratio": True}, "boundary_ratio: must be a number in"),
    ({**T2V, "expand_timesteps": "yes"}, "expand_timesteps: must be true, false or null"),
    ({**T2V, "transformer": [None, None]}, "transformer is null"),
])
def test_bad_index_settings_are_refused_with_the_field(index, message):
    with pytest.raises(ModelLoadError, match=message):
        WanVariant.from_index(index, "model_index.json", False)


@pytest.mark.parametrize("variant, image, model_input, channels", [
    (WanVariant(), ImageInput.NONE, ModelInput, 4),
    (WanVariant(image_pipeline=True), ImageInput.REQUIRED, ConcatCondition, 12),
    (WanVariant(image_pipeline=True, first_last=True), ImageInput.FIRST_LAST, ConcatCondition, 12),
    (WanVariant(expand_timesteps=True), ImageInput.OPTIONAL, GivenFrames, 4),
    (WanVariant(image_pipeline=True, expand_timesteps=True), ImageInput.REQUIRED, GivenFrames, 4),
])
def test_what_the_stages_get_follows_from_the_record(variant, image, model_input, channels):
    vae = type("VaeConfig", (), {"z_dim": 4, "temporal_factor": 4})()
    assert variant.image_input == image and variant.image_input == image.value  # a str for RequestLimits.image
    assert type(variant.model_input((1, 2, 2))) is model_input
    assert variant.latent_input_channels(vae) == channels


def test_the_plan_completes_the_variant_from_the_configs(tiny_wan_dir, tmp_path, tiny_wan_pipe):
    from tests.parity.test_i2v_parity import build_i2v_folder

    plan = plan_folder(tiny_wan_dir, EngineConfig())
    assert plan.variant == WanVariant() and plan.limits.image == "none" and plan.refine is None
    flf = plan_folder(build_i2v_folder(tiny_wan_pipe, tmp_path / "flf", flf=True), EngineConfig())
    assert flf.variant.kind == "flf2v" and flf.limits.image == "first-last"
    assert sorted(flf.plans) == ["image_encoder", "image_processor", "scheduler", "text_encoder", "tokenizer",
                                 "transformer", "vae"]


def test_the_pipeline_and_info_read_the_same_record(tiny_generator, tiny_wan_dir, capsys):
    from vidloom.cli import main

    variant = tiny_generator.pipeline.variant
    assert isinstance(variant, WanVariant) and variant.kind == "t2v"
    assert main(["info", "--model", str(tiny_wan_dir)]) == 0
    assert f"variant: {variant.describe()}" in capsys.readouterr().out
