"""Build a model on the meta device and stream its safetensors weights into it.

No second full copy of the weights is made: each tensor is read from the file, cast to
the target dtype and device, and becomes the parameter. Every checkpoint key must be
consumed and every parameter filled, otherwise a ModelLoadError names the key and file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import ModelLoadError
from ..models.base import LoadableModel

WEIGHT_NAMES = ("diffusion_pytorch_model", "model")


def find_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a component folder (single file or sharded with an index)."""
    for stem in WEIGHT_NAMES:
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            return [single]
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise ModelLoadError(f"unreadable shard index ({exc})", file=str(index)) from exc
            files = [folder / name for name in sorted(set(weight_map.values()))]
            for f in files:
                if not f.is_file():
                    raise ModelLoadError("shard listed in the index is missing", file=str(f))
            return files
    raise ModelLoadError(
        "no safetensors weights found (expected diffusion_pytorch_model.safetensors, model.safetensors "
        "or a sharded *.safetensors.index.json)",
        file=str(folder),
    )


def _rename(key: str, table, reverse: bool = False) -> str:
    padded = f".{key}."
    for ckpt_frag, param_frag in table:
        src, dst = (param_frag, ckpt_frag) if reverse else (ckpt_frag, param_frag)
        padded = padded.replace(src, dst)
    return padded[1:-1]


def checkpoint_to_param_name(model_cls: type[LoadableModel], key: str) -> str:
    return _rename(key, model_cls.checkpoint_key_map)


def param_to_checkpoint_name(model_cls: type[LoadableModel], name: str) -> str:
    return _rename(name, model_cls.checkpoint_key_map, reverse=True)


def _target_dtype(model_cls, name: str, stored: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    if not stored.is_floating_point:
        return stored
    if any(pattern in f".{name}" for pattern in model_cls.keep_fp32):
        return torch.float32
    return dtype


def _set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)


def load_model(model_cls: type[LoadableModel], folder: str | Path, device="cpu", dtype=torch.float32):
    """Read ``config.json`` and the safetensors in ``folder`` into a ready ``model_cls``."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError("missing config.json", file=str(config_path))
    try:
        config = model_cls.config_class.from_json(config_path)
    except (ValueError, TypeError) as exc:
        raise ModelLoadError(f"invalid config ({exc})", file=str(config_path)) from exc

    with torch.device("meta"):
        model = model_cls(config)
    expected = dict(model.named_parameters())
    filled: set[str] = set()
    for path in find_weight_files(folder):
        _stream_file(model_cls, model, path, expected, filled, device, dtype)
    missing = sorted(set(expected) - filled)
    if missing:
        raise ModelLoadError(
            f"{len(missing)} parameter(s) not found in the checkpoint, first",
            file=str(folder),
            key=param_to_checkpoint_name(model_cls, missing[0]),
        )
    if any(b.is_meta for b in model.buffers()):
        raise ModelLoadError("model has buffers the checkpoint cannot fill", file=str(folder))
    return model.eval()


def _stream_file(model_cls, model, path: Path, expected, filled, device, dtype) -> None:
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ModelLoadError(f"cannot read safetensors file ({exc})", file=str(path)) from exc
    with handle as fh:
        for key in fh.keys():
            name = checkpoint_to_param_name(model_cls, key)
            if name not in expected:
                raise ModelLoadError("unexpected checkpoint key", file=str(path), key=key)
            try:
                tensor = fh.get_tensor(key)
            except Exception as exc:
                raise ModelLoadError(f"cannot read tensor ({exc})", file=str(path), key=key) from exc
            want = expected[name].shape
            if tuple(tensor.shape) != tuple(want):
                raise ModelLoadError(
                    f"shape mismatch: checkpoint {tuple(tensor.shape)} vs model {tuple(want)}",
                    file=str(path), key=key,
                )
            target = _target_dtype(model_cls, name, tensor.dtype, dtype)
            _set_tensor(model, name, tensor.to(device=device, dtype=target))
            filled.add(name)


def save_model(model: LoadableModel, folder: str | Path, version: str = "0.42.1") -> None:
    """Write ``config.json`` and ``diffusion_pytorch_model.safetensors`` in Diffusers layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": model.diffusers_class, "_diffusers_version": version, **model.config.to_dict()}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {
        param_to_checkpoint_name(type(model), name): p.detach().contiguous().cpu()
        for name, p in model.named_parameters()
    }
    save_file(tensors, os.fspath(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
