"""The compute dtype is declared by the loader, and stages compute in it whatever the weights hold."""

from __future__ import annotations

import types

import pytest
import torch

from vidloom.loader.compute import compute_dtype, record_compute_dtype
from vidloom.loader.weights import load_model
from vidloom.models.encoders import WanImageEncoder
from vidloom.models.wan_dit import WanDiT
from vidloom.pipelines.stages.decoding import DecodingStage
from vidloom.pipelines.stages.denoising import DenoisingStage


def test_the_loader_records_the_dtype_asked_for(tiny_wan_dir):
    model = load_model(WanDiT, tiny_wan_dir / "transformer", dtype=torch.bfloat16)
    assert compute_dtype(model) == torch.bfloat16
    # kept-float32 weights do not change what the model computes in
    assert model.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32


def test_an_undeclared_component_is_an_error():
    with pytest.raises(ValueError, match="no recorded compute dtype"):
        compute_dtype(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="floating-point"):
        record_compute_dtype(torch.nn.Linear(2, 2), torch.int8)


class _RecordingVae(torch.nn.Module):
    """Weights stored in float32; records the dtype the stage hands it."""

    def __init__(self):
        super().__init__()
        self.quant_conv = torch.nn.Linear(4, 4)
        self.config = types.SimpleNamespace(spatial_factor=8)
        self.seen = []

    def denormalize_latents(self, z):
        self.seen.append(z.dtype)
        return z

    def decode(self, z):
        return torch.zeros(z.shape[0], 3, *z.shape[2:], dtype=z.dtype)


def test_decoding_computes_in_the_declared_dtype_not_the_weights():
    vae = record_compute_dtype(_RecordingVae(), torch.float64)
    video = DecodingStage(vae).decode(torch.zeros(1, 4, 1, 2, 2))
    assert vae.seen == [torch.float64]
    assert video.dtype == torch.float32  # frames leave the stage in float32 whatever the VAE ran in


def test_denoising_casts_to_the_declared_dtype_not_the_weights():
    dit = torch.nn.Module()
    dit.proj_out = torch.nn.Linear(4, 4)  # float32 weights
    stage = DenoisingStage(record_compute_dtype(dit, torch.bfloat16), scheduler=None)
    assert stage.dtype == torch.bfloat16


class _RecordingImageEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(2, 2)  # float32 weights
        self.seen = []

    def forward(self, pixel_values, output_hidden_states):
        self.seen.append(pixel_values.dtype)
        hidden = torch.zeros(pixel_values.shape[0], 3, 2, dtype=pixel_values.dtype)
        return types.SimpleNamespace(hidden_states=(hidden, hidden))


def test_image_encoder_inputs_take_the_declared_dtype():
    from PIL import Image

    def processor(images, return_tensors):
        return types.SimpleNamespace(pixel_values=torch.zeros(len(images), 3, 4, 4))

    encoder = record_compute_dtype(_RecordingImageEncoder(), torch.float64)
    out = WanImageEncoder(processor, encoder).encode([Image.new("RGB", (4, 4))])
    assert encoder.seen == [torch.float64] and out.dtype == torch.float64
