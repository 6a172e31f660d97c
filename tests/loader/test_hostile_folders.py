"""Corrupt, mismatched and hostile model folders: each is a ModelLoadError naming the file (and
the field or key) before any component's weights are read, never a traceback, a hang, a pickle
read or a file outside the folder opened."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import vidloom.generator as generator_mod
from vidloom import ModelLoadError, VideoGenerator
from vidloom.loader.components import load_component

SMALL = dict(height=32, width=48, num_frames=5, num_inference_steps=2)


@pytest.fixture
def folder(tiny_wan_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_wan_dir, dst)
    return dst


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any component's weights are loaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("component weights were loaded before the error")

    monkeypatch.setattr(generator_mod, "load_components", refuse)


def edit_json(path, change):
    data = json.loads(path.read_text())
    data = change(data) or data
    path.write_text(json.dumps(data))


def write_raw(path, text):
    path.write_text(text)


def st_header(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def st_write(path, header, data):
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def dit_file(folder):
    return folder / "transformer" / "diffusion_pytorch_model.safetensors"


def expect_error(folder, match, file_part=None):
    with pytest.raises(ModelLoadError, match=match) as err:
        VideoGenerator.from_pretrained(folder, dtype="fp32")
    if file_part is not None:
        assert file_part in (err.value.file or ""), err.value
    return err.value


# ----------------------------------------------------------------------------- model_index.json


@pytest.mark.parametrize("text,match", [
    ("5", "must hold a JSON object, got int"),
    ('"xx_class_name"', "must hold a JSON object, got str"),
    ("[" * 200_000, "nested too deeply"),
    ('{"_class_name": ["WanPipeline"]}', "needs a string _class_name"),
])
def test_malformed_model_index(folder, no_loading, text, match):
    write_raw(folder / "model_index.json", text)
    expect_error(folder, match, "model_index.json")


@pytest.mark.parametrize("entry,match", [
    ("diffusers.AutoencoderKLWan", "component 'vae': entry must be \\[library, class\\]"),
    ({"library": "diffusers"}, "setting 'vae' must be a scalar"),
    (["diffusers", ["AutoencoderKLWan"]], "component 'vae': entry must be \\[library, class\\] \\(two strings\\)"),
    (["diffusers", "AutoencoderKLWan", "x"], "entry must be \\[library, class\\]"),
    (["diffusers", "NoSuchVAE"], "component 'vae': unsupported class diffusers.NoSuchVAE"),
])
def test_bad_last_component_fails_before_the_others_load(folder, no_loading, entry, match):
    edit_json(folder / "model_index.json", lambda d: d.update(vae=entry))
    expect_error(folder, match)


def test_missing_component_folder_and_files_fail_before_loading(folder, no_loading):
    shutil.rmtree(folder / "vae")
    expect_error(folder, "component folder 'vae' is missing")


# ----------------------------------------------------------------------------- config.json


@pytest.mark.parametrize("component,change,match", [
    ("transformer", {"num_layers": 10**9}, "num_layers: must be in 1..512, got 1000000000"),
    ("transformer", {"num_layers": 3}, "implies 3 of 'blocks.N.' but the checkpoint holds indices 0..1"),
    ("transformer", {"num_layers": 1.5}, "num_layers: expected an integer, got 1.5"),
    ("transformer", {"num_layers": "2"}, "num_layers: expected an integer, got '2'"),
    ("transformer", {"out_channels": -4}, "out_channels: must be in 1..4096, got -4"),
    ("transformer", {"cross_attn_norm": "no"}, "cross_attn_norm: expected true or false, got 'no'"),
    ("transformer", {"eps": "tiny"}, "eps: expected a finite number, got 'tiny'"),
    ("transformer", {"eps": -1.0}, "eps: must be in \\(0, 1\\)"),
    ("transformer", {"num_attention_heads": 10**9, "attention_head_dim": 10**9}, "num_attention_heads: must be in"),
    ("vae", {"num_res_blocks": 10**9}, "num_res_blocks: must be an integer in 1..16"),
    ("vae", {"num_res_blocks": 2}, "implies 3 of 'decoder.up_blocks.0.resnets.N.'"),
    ("vae", {"dim_mult": [1, 2, 2, 10**9]}, "dim_mult: must be 1..8 integers in 1..64"),
    ("vae", {"dropout": "x"}, "dropout: expected a finite number, got 'x'"),
    ("text_encoder", {"num_layers": 10**7}, r"num_layers: must be an integer in 1..256"),
    ("text_encoder", {"num_layers": 3}, "implies 3 of 'encoder.block.N.'"),
    ("text_encoder", {"vocab_size": 10**6}, r"shape mismatch: checkpoint \(\d+, 16\) vs config"),
])
def test_bad_config_fails_fast_naming_the_field(folder, no_loading, component, change, match):
    edit_json(folder / component / "config.json", lambda d: d.update(change))
    expect_error(folder, match, component)


@pytest.mark.parametrize("text,match", [("[1, 2]", "must hold a JSON object, got list"),
                                        ("{nope", "not valid JSON")])
def test_config_not_an_object(folder, no_loading, text, match):
    write_raw(folder / "transformer" / "config.json", text)
    expect_error(folder, match, "transformer/config.json")


def test_scheduler_config_not_an_object(folder, no_loading):
    write_raw(folder / "scheduler" / "scheduler_config.json", "[]")
    expect_error(folder, "scheduler_config.json must hold a JSON object", "scheduler")


@pytest.mark.parametrize("change,match", [
    (("transformer", {"text_dim": 24}), "transformer text_dim=24 but text_encoder d_model=16"),
    (("vae", {"z_dim": 8, "latents_mean": [0.0] * 8, "latents_std": [1.0] * 8}),
     "transformer in_channels=4 but vae z_dim=8"),
])
def test_components_that_do_not_fit_each_other(folder, no_loading, change, match):
    component, values = change
    edit_json(folder / component / "config.json", lambda d: d.update(values))
    expect_error(folder, match)


def test_image_conditioned_transformer_in_a_text_to_video_folder(folder, no_loading):
    edit_json(folder / "transformer" / "config.json", lambda d: d.update(image_dim=20, added_kv_proj_dim=24))
    expect_error(folder, "transformer is image-conditioned .* gives it no image")


def test_empty_tokenizer_folder(folder, no_loading):
    for f in (folder / "tokenizer").iterdir():
        f.unlink()
    expect_error(folder, "no tokenizer files", "tokenizer")


# ----------------------------------------------------------------------------- safetensors


def test_overlapping_tensors_are_rejected(folder):
    path = dit_file(folder)
    header, data = st_header(path)
    key = "blocks.0.attn1.norm_k.weight"
    for other in [k for k, v in header.items() if k not in ("__metadata__", key)
                  and v["shape"] == header[key]["shape"] and v["dtype"] == header[key]["dtype"]][:3]:
        header[other] = dict(header[other], data_offsets=header[key]["data_offsets"])
    st_write(path, header, data)
    expect_error(folder, "overlaps the tensor before it|leaves a gap", "transformer")


def test_trailing_bytes_are_rejected(folder):
    path = dit_file(folder)
    path.write_bytes(path.read_bytes() + b"\0" * 1000)
    expect_error(folder, "1000 bytes after the last tensor belong to no tensor", "transformer")


@pytest.mark.parametrize("corrupt,match", [
    (lambda h: h.update({"proj_out.bias": dict(h["proj_out.bias"], dtype=["F32"])}), r"unknown dtype \['F32'\]"),
])
def test_header_values_of_the_wrong_type(folder, corrupt, match):
    path = dit_file(folder)
    header, data = st_header(path)
    corrupt(header)
    st_write(path, header, data)
    expect_error(folder, match, "transformer")


def test_deeply_nested_header(folder):
    path = dit_file(folder)
    raw = b"[" * 100_000
    path.write_bytes(len(raw).to_bytes(8, "little") + raw)
    expect_error(folder, "header is nested too deeply", "transformer")


def test_integer_weights_for_float_parameters(folder):
    path = dit_file(folder)
    tensors = load_file(path)
    tensors["proj_out.weight"] = tensors["proj_out.weight"].to(torch.int32)
    save_file(tensors, str(path))
    err = expect_error(folder, "stored as torch.int32 but the model's parameters are floating point")
    assert err.key == "proj_out.weight"


# ----------------------------------------------------------------------------- shards


def _shard(folder, tiny_wan_pipe, names):
    """transformer/ as a two-shard checkpoint whose index then names ``names`` as shards."""
    dst = folder / "transformer"
    shutil.rmtree(dst)
    tiny_wan_pipe.transformer.save_pretrained(str(dst), max_shard_size="20KB")
    index = dst / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    keys = sorted(data["weight_map"])
    data["weight_map"] = {k: names[i % len(names)] for i, k in enumerate(keys)}
    index.write_text(json.dumps(data))
    return index


@pytest.mark.parametrize("name", ["../../../outside/evil.safetensors", "/etc/passwd", "sub/x.safetensors", ".."])
def test_shard_names_cannot_leave_the_component_folder(folder, tiny_wan_pipe, no_loading, name, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file(load_file(dit_file(folder)), str(outside / "evil.safetensors"))  # a valid file outside
    _shard(folder, tiny_wan_pipe, [name])
    expect_error(folder, "shards must be \\*.safetensors files of the component's own folder", "index.json")


@pytest.mark.parametrize("weight_map", [["a.safetensors"], {"proj_out.bias": 5}, {}])
def test_shard_index_structure(folder, tiny_wan_pipe, no_loading, weight_map):
    index = _shard(folder, tiny_wan_pipe, ["x"])
    index.write_text(json.dumps({"weight_map": weight_map}))
    expect_error(folder, "needs a non-empty weight_map", "index.json")


def test_shard_index_not_an_object(folder, tiny_wan_pipe, no_loading):
    index = _shard(folder, tiny_wan_pipe, ["x"])
    index.write_text("[]")
    expect_error(folder, "shard index must hold a JSON object", "index.json")


# ----------------------------------------------------------------------------- pickles


def test_text_encoder_never_reads_a_pickle(folder):
    """A state dict saved with torch.save as pytorch_model.bin, next to a decoy file with the DiT's
    weight name: transformers' .bin fallback must not be taken."""
    te = folder / "text_encoder"
    state = load_file(te / "model.safetensors")
    (te / "model.safetensors").unlink()
    torch.save(state, te / "pytorch_model.bin")
    (te / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no safetensors weights found .*model.safetensors"):
        VideoGenerator.from_pretrained(folder, dtype="fp32")
    with pytest.raises(ModelLoadError):
        load_component(folder, "text_encoder", ["transformers", "UMT5EncoderModel"], torch.device("cpu"),
                       torch.float32)


# ----------------------------------------------------------------------------- today's tokenizers


def test_tokenizer_saved_as_tokenizers_backend_loads(folder, tiny_wan_dir):
    """transformers 5 saves a PreTrainedTokenizerFast as ["transformers", "TokenizersBackend"]."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tiny_wan_dir / "tokenizer" / "tokenizer.json"),
                                  pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok.model_max_length = 512
    shutil.rmtree(folder / "tokenizer")
    tok.save_pretrained(str(folder / "tokenizer"))
    from diffusers.pipelines.pipeline_loading_utils import _fetch_class_library_tuple

    library, class_name = _fetch_class_library_tuple(tok)
    edit_json(folder / "model_index.json", lambda d: d.update(tokenizer=[library, class_name]))
    ours = VideoGenerator.from_pretrained(folder, dtype="fp32").generate("a cat", seed=1, **SMALL).frames
    ref = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32").generate("a cat", seed=1, **SMALL).frames
    assert torch.equal(torch.from_numpy(ours), torch.from_numpy(ref))


def test_model_classes_stay_strict(folder, no_loading):
    edit_json(folder / "model_index.json", lambda d: d.update(text_encoder=["transformers", "T5EncoderModel"]))
    expect_error(folder, "unsupported class transformers.T5EncoderModel")


# ----------------------------------------------------------------------------- mapped weights

_TRUNCATE = """
import os, sys
from vidloom import ModelLoadError, VideoGenerator
folder, mapped = sys.argv[1], sys.argv[2] == "mapped"
gen = VideoGenerator.from_pretrained(folder, dtype="fp32", map_weights=mapped)
small = dict(height=32, width=48, num_frames=5, num_inference_steps=2)
first = gen.generate("a cat", seed=1, **small).frames
os.truncate(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"), 1000)
try:
    again = gen.generate("a cat", seed=1, **small).frames
    print("same" if (again == first).all() else "different")
except ModelLoadError as exc:
    print("error:", exc)
"""


@pytest.mark.parametrize("mapped", ["mapped", "read"])
def test_truncated_weight_file_under_a_live_generator(folder, mapped):
    """Mapped: the next request is refused with a clear error (reading a truncated mapped page
    would kill the process with SIGBUS). Read into memory: the engine keeps working."""
    proc = subprocess.run([sys.executable, "-c", _TRUNCATE, str(folder), mapped], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    if mapped == "mapped":
        assert last.startswith("error: the transformer weights changed on disk since they were loaded"), last
    else:
        assert last == "same"


def test_file_rewritten_in_place_is_noticed(folder, tiny_wan_dir):
    gen = VideoGenerator.from_pretrained(folder, dtype="fp32")
    gen.submit("a cat", **SMALL)
    path = dit_file(folder)
    size, inode = path.stat().st_size, path.stat().st_ino
    with open(path, "r+b") as fh:  # an in-place write: same size, same inode, one tensor's bytes changed
        fh.seek(size - 4)
        fh.write(b"\x00\x00\x80\x7f")  # the last float becomes inf
    # file systems with coarse timestamps may keep the mtime within one tick: make the write visible
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert path.stat().st_size == size and path.stat().st_ino == inode
    with pytest.raises(ModelLoadError, match="changed on disk"):
        gen.submit("a cat", **SMALL)
