"""Loading model folders: registry, every key consumed, clear errors naming file and key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from vidloom import ModelLoadError, VideoGenerator, cpu
from vidloom.loader import weights as weights_mod
from vidloom.loader.weights import load_model, param_to_checkpoint_name, save_model
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
    mapped = [param_to_checkpoint_name(WanDiT, n) for n, _ in model.named_parameters()]
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


# ----------------------------------------------------------------------------- the safetensors reader

def _header(path):
    """(header dict, data start) of a safetensors file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), 8 + n


def _write_with_header(path, header, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def _bits(t):
    return t.contiguous().view(-1).view(torch.uint8)


def _reference_param(ckpt, name, dtype):
    """What safetensors gives for parameter ``name``, cast."""
    return ckpt[param_to_checkpoint_name(WanDiT, name)].to(dtype)


@pytest.mark.parametrize("amx", [True, False], ids=["amx", "no-amx"])
@pytest.mark.parametrize("map_weights", [True, False], ids=["mapped", "read"])
@pytest.mark.parametrize("stored,loaded", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                           (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_loading_is_bit_exact(tiny_wan_dir, tmp_path, monkeypatch, stored, loaded, map_weights, amx):
    src = load_file(weights(tiny_wan_dir))
    folder = tmp_path / "transformer"
    folder.mkdir()
    shutil.copy(tiny_wan_dir / "transformer" / "config.json", folder / "config.json")
    ckpt = {k: v.to(stored) for k, v in src.items()}
    save_file(ckpt, str(folder / "diffusion_pytorch_model.safetensors"))
    # tiny tensors: force several staging chunks per tensor
    monkeypatch.setattr(weights_mod, "STAGING_BYTES", 100)
    monkeypatch.setattr(weights_mod, "TRANSPOSE_ROWS", 3)
    with cpu.forced(input_major_bf16=amx):  # the layout is a plain strided tensor on every CPU
        model = load_model(WanDiT, folder, dtype=loaded, map_weights=map_weights)
    file_bytes = (folder / "diffusion_pytorch_model.safetensors").stat().st_size
    for name, p in model.named_parameters():
        want = _reference_param(ckpt, name, p.dtype)
        assert p.dtype == (torch.float32 if any(k in f".{name}" for k in WanDiT.keep_fp32) else loaded), name
        assert p.shape == want.shape and torch.equal(_bits(p), _bits(want)), name
        # a view of the file exactly when it is used as stored: same dtype, file layout
        as_stored = (p.dtype == stored
                     and not (amx and p.dtype == torch.bfloat16 and name.endswith(".weight") and p.dim() == 2))
        assert (p.untyped_storage().nbytes() == file_bytes) == (map_weights and as_stored), name
    q = model.blocks[0].attn1.to_q.weight
    assert q.stride() == ((1, q.shape[0]) if loaded == torch.bfloat16 and amx else (q.shape[1], 1))
    proj = model.proj_out.weight
    assert proj.stride() == ((1, proj.shape[0]) if loaded == torch.bfloat16 and amx else (proj.shape[1], 1))


def test_meta_build_skips_init_on_its_own_thread_only():
    """The loader builds without running initialisers, and a model built meanwhile on another
    thread is initialised as usual."""
    other = {}

    def build_elsewhere():
        other["weight"] = torch.nn.Linear(8, 8).weight

    with weights_mod._MetaBuild():
        meta = torch.nn.Linear(8, 8).weight
        untouched = torch.nn.init.uniform_(torch.zeros(4, device="cpu"))  # skipped, even off meta
        thread = threading.Thread(target=build_elsewhere)
        thread.start()
        thread.join()
    assert meta.is_meta and torch.equal(untouched, torch.zeros(4))
    assert not other["weight"].is_meta and other["weight"].abs().sum() > 0


def test_mapped_parameters_are_copy_on_write(model_copy):
    """Writing to a parameter that is a view of the file changes the model, never the file."""
    path = weights(model_copy)
    before = path.read_bytes()
    model = load_model(WanDiT, model_copy / "transformer")
    bias = model.proj_out.bias
    assert bias.untyped_storage().nbytes() == len(before)  # mapped
    with torch.no_grad():
        bias.add_(1.0)
    assert path.read_bytes() == before
    fresh = load_model(WanDiT, model_copy / "transformer")
    assert torch.equal(fresh.proj_out.bias + 1.0, bias)


def test_unaligned_tensors_are_read_not_mapped(model_copy):
    """A file whose data does not start on a 4-byte boundary (legal, if unusual) loads by reading."""
    path = weights(model_copy)
    header, start = _header(path)
    data = path.read_bytes()[start:]
    raw = json.dumps(header).encode() + b" "  # header length 1 more: every fp32 tensor off by one byte
    assert (8 + len(raw)) % 4
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    model = load_model(WanDiT, model_copy / "transformer")
    ckpt = load_file(path)
    for name, p in model.named_parameters():
        assert p.untyped_storage().nbytes() != len(data) + 8 + len(raw), name
        assert torch.equal(p, _reference_param(ckpt, name, p.dtype)), name


def test_truncated_data_names_file_and_key(model_copy):
    path = weights(model_copy)
    header, start = _header(path)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    path.write_bytes(path.read_bytes()[:-10])  # the header is intact, the data 10 bytes short
    with pytest.raises(ModelLoadError, match="truncated") as err:
        load_model(WanDiT, model_copy / "transformer")
    assert err.value.key == last and err.value.file == str(path)


@pytest.mark.parametrize("corrupt,match,names_key", [
    (lambda h, d: (b"\xff" * 8, b""), "header length", False),
    (lambda h, d: (len(b"{nope").to_bytes(8, "little") + b"{nope", d), "not valid JSON", False),
    (lambda h, d: _replace(h, d, dtype="F7"), "unknown dtype 'F7'", True),
    (lambda h, d: _replace(h, d, shape=[-1]), "invalid shape", True),
    (lambda h, d: _replace(h, d, data_offsets=[8, 4]), "invalid data_offsets", True),
    (lambda h, d: _replace(h, d, shape=[3, 3]), "F32 needs 36", True),
])
def test_bad_header_names_file(model_copy, corrupt, match, names_key):
    path = weights(model_copy)
    header, start = _header(path)
    data = path.read_bytes()[start:]
    head, body = corrupt(header, data)
    path.write_bytes(head + body)
    with pytest.raises(ModelLoadError, match=f"cannot read safetensors file.*{match}") as err:
        load_model(WanDiT, model_copy / "transformer")
    assert err.value.file == str(path)
    assert (err.value.key == "proj_out.bias") == names_key


def _replace(header, data, **fields):
    header = dict(header)
    header["proj_out.bias"] = {**header["proj_out.bias"], **fields}
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw, data


def test_file_shrinking_while_loading(model_copy, monkeypatch):
    real = os.preadv

    def short_read(fd, buffers, offset):  # the file ends early, as if truncated under the loader
        return 0 if offset > 4096 else real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", short_read)
    with pytest.raises(ModelLoadError, match="file ended early") as err:
        load_model(WanDiT, model_copy / "transformer", map_weights=False)  # read, not mapped
    assert err.value.key and err.value.file == str(weights(model_copy))


_PEAK_SCRIPT = """
import sys, torch
from vidloom.loader.weights import load_model
from vidloom.models.wan_dit import WanDiT, WanDiTConfig
def status(field):  # kB; VmHWM is this process's own peak (ru_maxrss keeps a forking parent's across exec)
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field))
with torch.device("meta"):  # imports that building a model triggers, outside the measurement
    WanDiT(WanDiTConfig.from_json(sys.argv[1] + "/config.json"))
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # peak := current
before = status("VmRSS")
model = load_model(WanDiT, sys.argv[1], dtype=getattr(torch, sys.argv[2]))
print(status("VmHWM") - before, sum(p.numel() * p.element_size() for p in model.parameters()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_peak_memory_is_about_the_weights(tmp_path, dtype):
    """Loading holds the weights once: no mapped file pages, no second copy (18 or 36 MB of weights)."""
    from vidloom.models.wan_dit import WanDiTConfig

    cfg = WanDiTConfig(num_attention_heads=4, attention_head_dim=64, ffn_dim=1024, num_layers=8, text_dim=256,
                       freq_dim=64)
    torch.manual_seed(0)
    save_model(WanDiT(cfg).to(torch.bfloat16), tmp_path)
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path), dtype], check=True,
                         capture_output=True, text=True)
    peak, weights_bytes = (int(v) for v in out.stdout.split())
    assert peak <= 1.15 * weights_bytes + 8 * 2**20, (peak, weights_bytes)  # the old loader: 2.1x, 1.55x
