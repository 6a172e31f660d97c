"""Loading model folders: registry, every key consumed, clear errors naming file and key."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vidloom import ModelLoadError, VideoGenerator
from vidloom.loader.weights import load_model, param_to_checkpoint_names
from vidloom.models.wan_dit import WanDiT
from vidloom.pipelines import registered_pipelines


@pytest.fixture
def model_copy(tiny_wan_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_wan_dir, dst)
    return dst


def weights(folder):
    return folder / "transformer" / "diffusion_pytorch_model.safetensors"


def test_pipeline_registry_discovers_wan():
    assert "WanPipeline" in registered_pipelines()


def test_every_checkpoint_key_is_consumed(tiny_wan_dir):
    model = load_model(WanDiT, tiny_wan_dir / "transformer")
    ckpt_keys = set(load_file(weights(tiny_wan_dir)))
    mapped = [k for n, _ in model.named_parameters() for k in param_to_checkpoint_names(WanDiT, n)]
    assert len(mapped) == len(set(mapped)) and set(mapped) == ckpt_keys
    assert not any(p.is_meta for p in model.parameters())


def test_sharded_checkpoint_loads_equal(tiny_wan_dir, tiny_wan_pipe, tmp_path):
    tiny_wan_pipe.transformer.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    a = load_model(WanDiT, tmp_path / "sharded")
    b = load_model(WanDiT, tiny_wan_dir / "transformer")
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        VideoGenerator.from_pretrained(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        VideoGenerator.from_pretrained(tmp_path / "nope")


def test_missing_weights_file(model_copy):
    weights(model_copy).unlink()
    with pytest.raises(ModelLoadError, match="no safetensors weights found") as err:
        VideoGenerator.from_pretrained(model_copy, dtype="fp32")
    assert "transformer" in str(err.value)


def test_corrupt_weights_file(model_copy):
    path = weights(model_copy)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="cannot read safetensors") as err:
        VideoGenerator.from_pretrained(model_copy, dtype="fp32")
    assert str(path) in str(err.value)


def test_unexpected_key(model_copy):
    path = weights(model_copy)
    tensors = load_file(path)
    tensors["blocks.0.extra.weight"] = torch.zeros(3)
    save_file(tensors, str(path))
    with pytest.raises(ModelLoadError, match="unexpected checkpoint key.*blocks.0.extra.weight"):
        load_model(WanDiT, model_copy / "transformer")


def test_missing_key(model_copy):
    path = weights(model_copy)
    tensors = load_file(path)
    del tensors["blocks.1.ffn.net.2.bias"]
    save_file(tensors, str(path))
    with pytest.raises(ModelLoadError, match="not found in the checkpoint.*blocks.1.ffn.net.2.bias"):
        load_model(WanDiT, model_copy / "transformer")


def test_shape_mismatch(model_copy):
    cfg_path = model_copy / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["ffn_dim"] = 48
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"shape mismatch.*blocks.0.ffn.net.0.proj.(weight|bias)"):
        load_model(WanDiT, model_copy / "transformer")


def test_text_encoder_missing_key(model_copy):
    path = model_copy / "text_encoder" / "model.safetensors"
    tensors = load_file(path)
    name = next(k for k in tensors if "layer.1.DenseReluDense.wo" in k)
    del tensors[name]
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="missing keys"):
        VideoGenerator.from_pretrained(model_copy, dtype="fp32")


def test_unsupported_pipeline_class(model_copy):
    index = json.loads((model_copy / "model_index.json").read_text())
    index["_class_name"] = "CogVideoXPipeline"
    (model_copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="unsupported pipeline 'CogVideoXPipeline'.*WanPipeline"):
        VideoGenerator.from_pretrained(model_copy)


def test_unknown_engine_option(tiny_wan_dir):
    with pytest.raises(ValueError, match="unknown engine option"):
        VideoGenerator.from_pretrained(tiny_wan_dir, dtpye="fp32")
    with pytest.raises(ValueError, match="dit_dtype: unknown dtype 'int8'"):
        VideoGenerator.from_pretrained(tiny_wan_dir, dit_dtype="int8")


def test_component_dtypes(tiny_wan_dir):
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="bf16", vae_dtype="fp32")
    comps = gen.pipeline.components
    assert comps["transformer"].proj_out.weight.dtype == torch.bfloat16
    assert comps["text_encoder"].dtype == torch.bfloat16
    assert next(comps["vae"].parameters()).dtype == torch.float32
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype=torch.float32, dit_dtype="bf16")
    assert gen.pipeline.components["transformer"].proj_out.weight.dtype == torch.bfloat16
    assert gen.pipeline.components["text_encoder"].dtype == torch.float32
