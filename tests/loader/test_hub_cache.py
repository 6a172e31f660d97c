"""Model folders as the Hugging Face cache stores them: ``models--org--name/snapshots/<rev>/...``,
where every file is a relative symlink into ``models--org--name/blobs/<sha256>`` (the index json
and the configs too), and ``refs/main`` names the revision. Sharded weights must load from such a
snapshot exactly as from a plain folder, while an index still may not name a file outside its
component folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch

from vidloom import ModelLoadError, VideoGenerator

SMALL = dict(height=32, width=48, num_frames=5, num_inference_steps=2)
REVISION = "0123456789abcdef0123456789abcdef01234567"


def as_hub_cache(src, cache, repo: str = "org/name"):
    """Move every file of ``src`` into ``cache``'s blobs and link it from a snapshot, as
    ``huggingface_hub.snapshot_download`` leaves them. Returns the snapshot folder."""
    root = cache / ("models--" + repo.replace("/", "--"))
    blobs, snapshot = root / "blobs", root / "snapshots" / REVISION
    blobs.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(REVISION)
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        blob = blobs / hashlib.sha256(path.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.move(path, blob)
        link = snapshot / path.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))  # e.g. ../../../blobs/<sha256>
    shutil.rmtree(src)
    return snapshot


def sharded_copy(tiny_wan_dir, tiny_wan_pipe, dst):
    """The tiny model with its transformer and its UMT5 text encoder saved in several shards."""
    shutil.copytree(tiny_wan_dir, dst)
    for name, module, stem in (("transformer", tiny_wan_pipe.transformer, "diffusion_pytorch_model"),
                               ("text_encoder", tiny_wan_pipe.text_encoder, "model")):
        shutil.rmtree(dst / name)
        module.save_pretrained(str(dst / name), max_shard_size="20KB")
        index = json.loads((dst / name / f"{stem}.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 2, name
    return dst


def first_shard(component):
    return sorted(component.glob("*-00001-of-*.safetensors"))[0]


@pytest.fixture(scope="module")
def snapshot(tiny_wan_dir, tiny_wan_pipe, tmp_path_factory):
    base = tmp_path_factory.mktemp("hub")
    return as_hub_cache(sharded_copy(tiny_wan_dir, tiny_wan_pipe, base / "src"), base / "cache")


def test_the_snapshot_is_laid_out_as_the_hub_does(snapshot):
    shard = first_shard(snapshot / "transformer")
    assert shard.is_symlink() and os.readlink(shard).startswith("../../../blobs/")
    te_shard = first_shard(snapshot / "text_encoder")
    assert te_shard.name.startswith("model-00001-of-0000")
    assert te_shard.is_symlink() and (snapshot / "text_encoder" / "model.safetensors.index.json").is_symlink()
    assert os.readlink(snapshot / "model_index.json").startswith("../../blobs/")
    assert (snapshot.parent.parent / "refs" / "main").read_text() == REVISION


def test_sharded_snapshot_loads_and_generates_as_the_plain_folder(snapshot, tiny_generator):
    ours = VideoGenerator.from_pretrained(snapshot, dtype="fp32").generate("a cat", seed=1, **SMALL).frames
    ref = tiny_generator.generate("a cat", seed=1, **SMALL).frames
    assert torch.equal(torch.from_numpy(ours), torch.from_numpy(ref))


@pytest.mark.parametrize("component,index_name", [
    ("transformer", "diffusion_pytorch_model.safetensors.index.json"),
    ("text_encoder", "model.safetensors.index.json"),
])
@pytest.mark.parametrize("name", ["../x.safetensors", "/etc/passwd", "../../../blobs/x.safetensors",
                                  "sub/x.safetensors", "..\\x.safetensors", "x\0.safetensors", "x\n.safetensors",
                                  ".", "model.bin"])
def test_a_snapshot_index_still_names_only_files_of_its_folder(snapshot, tmp_path, component, index_name, name):
    """The index is a link into blobs like every file; replacing it with one that names a file
    outside the folder is refused, with one line naming the index as the snapshot holds it."""
    folder = tmp_path / "model"
    shutil.copytree(snapshot, folder, symlinks=False)  # a private copy of the snapshot's files
    index = folder / component / index_name
    data = json.loads(index.read_text())
    data["weight_map"] = {key: name for key in data["weight_map"]}
    index.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="shards must be \\*.safetensors files of the component's own folder") \
            as err:
        VideoGenerator.from_pretrained(folder, dtype="fp32")
    assert err.value.file == str(index)
    assert "\n" not in str(err.value)


def test_a_linked_index_naming_outside_files_is_refused_in_the_cache(snapshot, tmp_path):
    """The same refusal with the index itself a link into a blobs folder, as in the cache."""
    cache = tmp_path / "cache"
    src = tmp_path / "src"
    shutil.copytree(snapshot, src, symlinks=False)
    index = src / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {key: "../../../blobs/" + os.path.basename(os.readlink(
        first_shard(snapshot / "transformer"))) for key in data["weight_map"]}
    index.write_text(json.dumps(data))
    linked = as_hub_cache(src, cache)
    with pytest.raises(ModelLoadError, match="shards must be") as err:
        VideoGenerator.from_pretrained(linked, dtype="fp32")
    assert err.value.file == str(linked / "transformer" / "diffusion_pytorch_model.safetensors.index.json")


def test_a_component_folder_linked_into_another_snapshot_loads(snapshot, tiny_wan_dir, tiny_generator, tmp_path):
    """The one rule for folders: a component folder may be a link (here the sharded text encoder
    and transformer of a cache snapshot, shared with a plain folder); only names are confined."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_wan_dir, folder)
    for name in ("text_encoder", "transformer"):
        shutil.rmtree(folder / name)
        (folder / name).symlink_to(snapshot / name, target_is_directory=True)
    ours = VideoGenerator.from_pretrained(folder, dtype="fp32").generate("a cat", seed=1, **SMALL).frames
    ref = tiny_generator.generate("a cat", seed=1, **SMALL).frames
    assert torch.equal(torch.from_numpy(ours), torch.from_numpy(ref))


def test_a_shard_link_to_something_not_a_file_is_refused(snapshot, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(snapshot, folder, symlinks=False)
    shard = first_shard(folder / "transformer")
    shard.unlink()
    shard.symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(ModelLoadError, match="missing \\(or not a regular file\\)") as err:
        VideoGenerator.from_pretrained(folder, dtype="fp32")
    assert err.value.file == str(shard)
