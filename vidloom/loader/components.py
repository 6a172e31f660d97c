"""``model_index.json`` -> loaded components, each chosen by its (library, class name)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError
from .weights import find_weight_files, load_model

log = logging.getLogger(__name__)


def read_model_index(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError("model folder does not exist", file=str(folder))
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError("not a Diffusers model folder: model_index.json is missing", file=str(index))
    try:
        data = json.loads(index.read_text())
    except ValueError as exc:
        raise ModelLoadError(f"model_index.json is not valid JSON ({exc})", file=str(index)) from exc
    if "_class_name" not in data:
        raise ModelLoadError("model_index.json has no _class_name", file=str(index))
    return data


def _load_dit(folder: Path, device, dtype):
    from ..models.wan_dit import WanDiT

    return load_model(WanDiT, folder, device, dtype)


def _load_vae(folder: Path, device, dtype):
    from ..models.wan_vae import WanVAE

    return load_model(WanVAE, folder, device, dtype)


def _load_umt5(folder: Path, device, dtype):
    from transformers import UMT5EncoderModel

    find_weight_files(folder)  # a clear error before transformers' own when weights are missing
    try:
        model, info = UMT5EncoderModel.from_pretrained(
            str(folder), dtype=dtype, output_loading_info=True, local_files_only=True
        )
    except Exception as exc:
        raise ModelLoadError(f"text encoder failed to load ({type(exc).__name__}: {exc})", file=str(folder)) from exc
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = [k for k in info.get(kind, []) if not _tied_embedding(k)]
        if keys:
            first = keys[0] if isinstance(keys[0], str) else keys[0][0]
            raise ModelLoadError(f"text encoder checkpoint has {kind.replace('_', ' ')}", file=str(folder), key=first)
    return model.to(device).eval().requires_grad_(False)


def _tied_embedding(key) -> bool:
    # UMT5's encoder embedding is stored once as "shared" and tied to "encoder.embed_tokens"
    return isinstance(key, str) and key.endswith("embed_tokens.weight")


def _load_tokenizer(folder: Path, device, dtype):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"tokenizer failed to load ({type(exc).__name__}: {exc})", file=str(folder)) from exc


def _load_scheduler(folder: Path, device, dtype):
    from ..schedulers import scheduler_from_config

    path = folder / "scheduler_config.json"
    if not path.is_file():
        raise ModelLoadError("missing scheduler_config.json", file=str(path))
    try:
        return scheduler_from_config(json.loads(path.read_text()))
    except ValueError as exc:
        raise ModelLoadError(f"unsupported scheduler config ({exc})", file=str(path)) from exc


# (library, class name) -> loader(folder, device, dtype)
COMPONENT_LOADERS: dict[tuple[str, str], Callable] = {
    ("diffusers", "WanTransformer3DModel"): _load_dit,
    ("diffusers", "AutoencoderKLWan"): _load_vae,
    ("transformers", "UMT5EncoderModel"): _load_umt5,
    ("transformers", "T5TokenizerFast"): _load_tokenizer,
    ("transformers", "T5Tokenizer"): _load_tokenizer,
    ("transformers", "AutoTokenizer"): _load_tokenizer,
    ("diffusers", "UniPCMultistepScheduler"): _load_scheduler,
    ("diffusers", "FlowMatchEulerDiscreteScheduler"): _load_scheduler,
}


def load_component(folder: Path, name: str, spec, device: torch.device, dtype: torch.dtype):
    """Load component ``name`` whose model_index entry is ``spec`` = [library, class] (or null)."""
    if spec is None or spec == [None, None]:
        return None
    if not (isinstance(spec, (list, tuple)) and len(spec) == 2):
        raise ModelLoadError(f"component '{name}' entry must be [library, class], got {spec!r}",
                             file=str(folder / "model_index.json"))
    library, class_name = spec
    loader = COMPONENT_LOADERS.get((library, class_name))
    if loader is None:
        known = ", ".join(f"{lib}.{cls}" for lib, cls in COMPONENT_LOADERS)
        raise ModelLoadError(f"component '{name}': unsupported class {library}.{class_name} (supported: {known})",
                             file=str(folder / "model_index.json"))
    sub = folder / name
    if not sub.is_dir():
        raise ModelLoadError(f"component folder '{name}' is missing", file=str(sub))
    log.info("loading %s (%s.%s) as %s", name, library, class_name, dtype)
    return loader(sub, device, dtype)
