"""``model_index.json`` -> components, each chosen by its (library, class name).

Loading is two phases. ``plan_component`` does everything that is cheap: it checks the entry,
the component folder, its config and its weight files' headers (for the models: the layer counts
against the checkpoint's keys), and returns a ``ComponentPlan`` whose ``load`` does the heavy
work. A folder is planned whole before the first weight is read, so a bad last component is an
error in milliseconds, not after minutes of loading the others.

Model classes are strict: each (library, class) has its own planner. Tokenizers and image
processors load through transformers' Auto classes whatever class name the index gives
(``T5TokenizerFast``, ``TokenizersBackend`` as transformers 5 names a ``PreTrainedTokenizerFast``,
``CLIPImageProcessor``, ...): the files in the folder say what they are. An image processor's
``preprocessor_config.json`` is checked first (``ImageProcessorConfig``: sizes bounded, flags,
normalisation), and against the image encoder's ``image_size`` by the pipeline.

Symlinks: names are confined, link targets are not. The component folders are the fixed names
of ``model_index.json``'s entries, the weight files fixed names in them, and a shard index may
name only plain ``*.safetensors`` file names of its own folder (``weights._shards``). Any of
them may be a symlink that leads anywhere: a Hugging Face cache snapshot
(``models--org--name/snapshots/<rev>/``) holds every file as a link into ``../blobs/``, and a
text encoder shared between two model folders through a linked folder is common. Whoever can
place links in the folder can replace its files as well, so confining targets would refuse
those layouts without protecting anything. The weight files, shard indexes and JSON files the
loader reads must be regular files wherever their links lead (a component must be a folder), so
a link to a FIFO or a device is refused, not opened.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError
from ..jsonfile import read_json_object, short_repr
from .compute import record_compute_dtype
from .weights import SafetensorsFile, check_layer_counts, find_weight_files, load_prepared, prepare_model

log = logging.getLogger(__name__)

# (device, dtype, map_weights, stored) -> component; ``stored``: a model's repeated blocks keep
# their checkpoint dtype and compute in ``dtype`` block by block (``loader.stored``); others ignore it
Loader = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class ComponentPlan:
    """A checked component: ``config`` is what later checks and limits read (an architecture
    config, a dict of facts, or None); ``load(device, dtype, map_weights, stored=False)`` builds it."""

    name: str
    library: str
    class_name: str
    folder: Path
    config: Any
    load: Loader


def read_model_index(folder: str | Path) -> dict[str, Any]:
    """The checked ``model_index.json`` of ``folder``: an object with a string ``_class_name``
    whose other entries are components (``[library, class]``, or ``[null, null]`` for none) or
    settings (scalars)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError("model folder does not exist", file=str(folder))
    path = folder / "model_index.json"
    if not path.is_file():
        raise ModelLoadError("not a Diffusers model folder: model_index.json is missing", file=str(path))
    data = read_json_object(path, "model_index.json")
    if not isinstance(data.get("_class_name"), str):
        raise ModelLoadError(f"model_index.json needs a string _class_name, got {short_repr(data.get('_class_name'))}",
                             file=str(path))
    for name, spec in data.items():
        if name.startswith("_"):
            continue
        if isinstance(spec, list):
            if not (len(spec) == 2 and all(v is None or isinstance(v, str) for v in spec)
                    and (spec[0] is None) == (spec[1] is None)):
                raise ModelLoadError(f"component '{name}': entry must be [library, class] (two strings) "
                                     f"or [null, null], got {short_repr(spec)}", file=str(path))
        elif not (spec is None or isinstance(spec, (bool, int, float, str))):
            raise ModelLoadError(f"setting '{name}' must be a scalar, got {short_repr(spec)}", file=str(path))
    return data


def component_spec(index: dict[str, Any], name: str, index_file: Path) -> tuple[str, str] | None:
    """The (library, class) of component ``name``, or None when the index has none."""
    spec = index.get(name)
    if spec is None or spec == [None, None]:
        return None
    if not isinstance(spec, list):
        raise ModelLoadError(f"component '{name}': entry must be [library, class], got {short_repr(spec)}",
                             file=str(index_file))
    return spec[0], spec[1]


def plan_component(folder: Path, name: str, spec: tuple[str, str]) -> ComponentPlan:
    """Check component ``name`` (``spec`` = (library, class)) without loading it."""
    library, class_name = spec
    planner = _planner(library, class_name)
    if planner is None:
        known = ", ".join(f"{lib}.{cls}" for lib, cls in MODEL_PLANNERS)
        raise ModelLoadError(f"component '{name}': unsupported class {library}.{class_name} (supported: {known}, "
                             "and transformers tokenizers and image processors)",
                             file=str(folder / "model_index.json"))
    sub = folder / name
    if not sub.is_dir():
        raise ModelLoadError(f"component folder '{name}' is missing", file=str(sub))
    config, load = planner(sub)
    return ComponentPlan(name, library, class_name, sub, config, load)


def load_component(folder: Path, name: str, spec, device: torch.device, dtype: torch.dtype | None,
                   map_weights: bool = True):
    """Plan and load component ``name`` whose model_index entry is ``spec`` (or null)."""
    if spec is None or list(spec) == [None, None]:
        return None
    plan = plan_component(folder, name, tuple(spec))
    log.info("loading %s (%s.%s) as %s", name, plan.library, plan.class_name, dtype)
    return plan.load(device, dtype, map_weights)


# ----------------------------------------------------------------------------- planners


def _plan_dit(folder: Path):
    from ..models.wan_dit import WanDiT

    prepared = prepare_model(WanDiT, folder)

    def load(device, dtype, map_weights, stored=False, extra=()):
        """``extra``: transforms applied first (e.g. ``parallel.tensor.TensorParallel``)."""
        from .transforms import default_transforms

        transforms = tuple(extra) + default_transforms()
        if stored:
            from .stored import StoredBlocks

            transforms += (StoredBlocks(dtype, WanDiT.keep_fp32),)
        return load_prepared(prepared, device, dtype, map_weights, transforms)

    return prepared.config, load


def _plan_vae(folder: Path):
    from ..models.wan_vae import WanVAE

    prepared = prepare_model(WanVAE, folder)
    _check_rgb_video(prepared.config, folder / "config.json")
    return prepared.config, lambda device, dtype, map_weights, stored=False: load_prepared(prepared, device, dtype,
                                                                                          map_weights)


RGB_CHANNELS = 3


def _check_rgb_video(config, path: Path) -> None:
    """The pipelines give the VAE RGB frames and take RGB frames from it: in_channels and
    out_channels must be 3 per pixel of its patches, 3 x patch_size^2 (Wan2.1: 3; Wan2.2's VAE:
    12 in 2x2 patches). Otherwise the first encode or decode fails with a shape error, late."""
    p = config.patch
    for name in ("in_channels", "out_channels"):
        channels = getattr(config, name)
        if channels == RGB_CHANNELS * p * p:
            continue
        root = math.isqrt(channels // RGB_CHANNELS)
        if channels % RGB_CHANNELS == 0 and root * root * RGB_CHANNELS == channels:
            allowed = "null or 1" if root == 1 else str(root)
            raise ModelLoadError(f"patch_size: {json.dumps(config.patch_size)} makes {name}={channels} frames of "
                                 f"{channels // (p * p)} channels, but the VAE takes and gives RGB frames (allowed: "
                                 f"{allowed}, for {name} = 3 x patch_size^2)", file=str(path))
        raise ModelLoadError(f"{name}: {channels} is not 3 x patch_size^2 = {RGB_CHANNELS * p * p} (RGB frames in "
                             f"{p}x{p} patches) (allowed: {RGB_CHANNELS * p * p})", file=str(path))


@dataclasses.dataclass(frozen=True)
class TransformersModel:
    """How a transformers model class is checked before transformers builds it: sane maxima of its
    config's sizes, the checkpoint's layer indices against the config's count, and tensors whose
    shape the config fixes (``shapes(config) -> {key: shape}``)."""

    class_name: str
    what: str  # "text encoder", "image encoder": for messages
    limits: dict[str, int]
    layers: tuple[tuple[str, Callable], ...]
    shapes: Callable[[dict], dict[str, tuple[int, ...]]]
    tied: tuple[str, ...] = ()  # key suffixes a checkpoint may omit (tied to another tensor)
    blocks: str | None = None  # the module path of its repeated blocks (``loader.stored``)
    tied_to: dict[str, str] = dataclasses.field(default_factory=dict)  # a key a checkpoint may omit -> its source
    # how parallel.tensor shards it over tensor-parallel ranks (empty: it is held whole on each)
    tensor_parallel_plan: tuple[tuple[str, str], ...] = ()
    # the Linear layers of its blocks left unquantized (``vidloom.quant``), by the end of their names
    quantize_keep: tuple[str, ...] = ()


UMT5 = TransformersModel(
    # umt5-xxl: 24 layers, d_model 4096, vocab 256384
    "UMT5EncoderModel", "text encoder",
    {"num_layers": 256, "d_model": 32768, "d_ff": 262144, "num_heads": 1024, "d_kv": 4096, "vocab_size": 2**22},
    ((r"encoder\.block\.(\d+)\.", lambda config: config["num_layers"]),),
    lambda c: {key: (c["vocab_size"], c["d_model"]) for key in ("shared.weight", "encoder.embed_tokens.weight")},
    tied=("embed_tokens.weight",),  # UMT5's encoder embedding is stored once as "shared"
    blocks="encoder.block",
    tied_to={"encoder.embed_tokens.weight": "shared.weight"},
    # heads and FFN units split; every layer has its own relative position bias (one column per head)
    tensor_parallel_plan=(
        ("encoder.block.*.layer.0.SelfAttention.[qkv]", "column"),
        ("encoder.block.*.layer.0.SelfAttention.o", "row"),
        ("encoder.block.*.layer.0.SelfAttention.relative_attention_bias", "embedding_columns"),
        ("encoder.block.*.layer.0.SelfAttention", "heads:n_heads,inner_dim"),
        ("encoder.block.*.layer.1.DenseReluDense.wi_[01]", "column"),
        ("encoder.block.*.layer.1.DenseReluDense.wo", "row"),
    ),
    # transformers keeps the FFN's output in float32 (_keep_in_fp32_modules) and casts the hidden
    # states to that weight's dtype in the forward: it stays a plain Linear
    quantize_keep=("DenseReluDense.wo",),
)


def _clip_vision(class_name: str) -> TransformersModel:
    # open-clip ViT-H/14 (Wan2.1 I2V): 32 layers, width 1280, 224 px in 14 px patches
    return TransformersModel(
        class_name, "image encoder",
        {"num_hidden_layers": 256, "hidden_size": 32768, "intermediate_size": 262144, "num_attention_heads": 1024,
         "image_size": 8192, "patch_size": 1024},
        # transformers 5 saves CLIPVisionModel's keys without the "vision_model." prefix it had before
        ((r"(?:vision_model\.)?encoder\.layers\.(\d+)\.", lambda config: config["num_hidden_layers"]),),
        lambda c: {f"{prefix}embeddings.position_embedding.weight":
                   ((c["image_size"] // c["patch_size"]) ** 2 + 1, c["hidden_size"]) for prefix in ("", "vision_model.")},
    )


def _plan_transformers_model(spec: TransformersModel, folder: Path):
    path = folder / "config.json"
    config = read_json_object(path, "config.json")
    refuse_custom_code(config, path)
    for key, high in spec.limits.items():
        value = config.get(key)
        if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= high):
            raise ModelLoadError(f"invalid config ({key}: must be an integer in 1..{high}, got {short_repr(value)})",
                                 file=str(path))
    # transformers reads model.safetensors (or its shard index) only; anything else in the folder,
    # a pickle above all, is never read: use_safetensors=True below refuses the .bin fallback
    files = find_weight_files(folder, stems=("model",))
    shapes = {}
    for file in files:
        with SafetensorsFile(file) as st:
            shapes.update({entry.key: entry.shape for entry in st.entries})
    check_layer_counts(spec.layers, config, list(shapes), folder)
    for key, shape in spec.shapes(config).items():
        if key in shapes and shapes[key] != shape:
            raise ModelLoadError(f"shape mismatch: checkpoint {shapes[key]} vs config {shape}", file=str(files[0]),
                                 key=key)

    def load(device, dtype, map_weights, stored=False, extra=()):
        """``extra``: a ``parallel.tensor.TensorParallel`` (the model loaded sharded by its plan)."""
        if extra:
            model = _load_transformers_sharded(spec, folder, device, dtype, extra[0])
        else:
            model = _load_transformers_model(spec, folder, device, dtype, stored)
        model.quantize_keep = spec.quantize_keep  # what vidloom.quant leaves as it is
        return model

    return config, load


def _load_transformers_model(spec: TransformersModel, folder: Path, device, dtype, stored: bool = False):
    import transformers

    compute = dtype
    if stored and spec.blocks is not None:  # the checkpoint's dtype kept in the blocks (loader.stored)
        if torch.device(device).type == "cpu":
            return _load_transformers_mapped(spec, folder, compute)
        dtype = _stored_dtype(folder) or dtype
    try:
        model, info = getattr(transformers, spec.class_name).from_pretrained(
            str(folder), dtype=dtype, output_loading_info=True, local_files_only=True, use_safetensors=True,
            trust_remote_code=False,
        )
    except Exception as exc:
        raise ModelLoadError(f"{spec.what} failed to load ({one_line(exc)})", file=str(folder)) from exc
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = [k for k in info.get(kind, []) if not (isinstance(k, str) and k.endswith(spec.tied))]
        if keys:
            first = keys[0] if isinstance(keys[0], str) else keys[0][0]
            raise ModelLoadError(f"{spec.what} checkpoint has {kind.replace('_', ' ')}", file=str(folder), key=first)
    for name, p in model.named_parameters():
        if not p.dtype.is_floating_point:
            raise ModelLoadError(f"{spec.what} parameter stored as {p.dtype}", file=str(folder), key=name)
    model = model.to(device).eval().requires_grad_(False)
    if compute is not None and dtype != compute:
        from .stored import keep_transformers_blocks_stored

        keep_transformers_blocks_stored(model, model.get_submodule(spec.blocks), compute)
    # without a dtype asked for, transformers keeps the checkpoint's: decided here, once
    return record_compute_dtype(model, compute if compute is not None else model.dtype)


def _meta_transformers_model(spec: TransformersModel, folder: Path):
    """``spec``'s transformers model built on the meta device from ``folder``'s config."""
    import transformers

    cls = getattr(transformers, spec.class_name)
    try:
        with torch.device("meta"):
            return cls(cls.config_class.from_pretrained(str(folder), local_files_only=True))
    except Exception as exc:
        raise ModelLoadError(f"{spec.what} failed to load ({one_line(exc)})", file=str(folder)) from exc


def _checked_entries(spec: TransformersModel, folder: Path, file: SafetensorsFile, shapes: dict[str, tuple]):
    """``file``'s tensors, each checked as transformers checks a checkpoint against ``shapes``
    (the checkpoint shape each parameter expects): a known key, that shape, floating point,
    aligned for its dtype."""
    for entry in file.entries:
        if entry.key not in shapes:
            raise ModelLoadError(f"{spec.what} checkpoint has unexpected keys", file=str(folder), key=entry.key)
        if shapes[entry.key] != entry.shape or not entry.dtype.is_floating_point:
            raise ModelLoadError(f"{spec.what} checkpoint has mismatched keys", file=str(folder), key=entry.key)
        if entry.offset % entry.dtype.itemsize:
            raise ModelLoadError(f"{spec.what} tensor is not aligned for its dtype", file=str(folder), key=entry.key)
        yield entry


def _set_parameters(spec: TransformersModel, folder: Path, model, values: dict[str, torch.Tensor]) -> None:
    """Fill every parameter of ``model`` from ``values`` (tied keys from their source), one
    Parameter per tensor so that ties stay tied; a parameter or buffer left unfilled is an error."""
    for name, tied in spec.tied_to.items():
        if name not in values and tied in values:
            values[name] = values[tied]
    missing = [name for name, _ in model.named_parameters(remove_duplicate=False) if name not in values]
    if missing:
        raise ModelLoadError(f"{spec.what} checkpoint has missing keys", file=str(folder), key=missing[0])
    modules = dict(model.named_modules())
    parameters: dict[int, torch.nn.Parameter] = {}
    for name, value in values.items():
        owner, _, leaf = name.rpartition(".")
        modules[owner]._parameters[leaf] = parameters.setdefault(id(value), torch.nn.Parameter(value, requires_grad=False))
    if any(b.is_meta for b in model.buffers()):
        raise ModelLoadError(f"{spec.what} has buffers the checkpoint cannot fill", file=str(folder))


def _load_transformers_mapped(spec: TransformersModel, folder: Path, compute: torch.dtype):
    """A transformers model built on meta and filled with views of its mapped safetensors files
    as stored (no copy), checked as transformers checks a checkpoint (every parameter filled, no
    key left over, shapes equal); its blocks then computed in ``compute`` block by block and the
    rest widened (``loader.stored.keep_transformers_blocks_stored``). On the CPU only."""
    from .stored import keep_transformers_blocks_stored
    from .weights import FileSnapshot

    model = _meta_transformers_model(spec, folder)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    values: dict[str, torch.Tensor] = {}
    snapshots, storages = [], set()
    for path in find_weight_files(folder, stems=("model",)):
        with SafetensorsFile(path) as file:
            mapping = file.mapping()
            snapshots.append(FileSnapshot.of(path))
            storages.add(mapping.data_ptr())
            for entry in _checked_entries(spec, folder, file, shapes):
                values[entry.key] = file.view(mapping, entry)
    _set_parameters(spec, folder, model, values)
    model = model.eval().requires_grad_(False)
    keep_transformers_blocks_stored(model, model.get_submodule(spec.blocks), compute)
    model.mapped_files, model.mapped_storages = tuple(snapshots), storages
    return record_compute_dtype(model, compute)


def _load_transformers_sharded(spec: TransformersModel, folder: Path, device, dtype, tensor_parallel):
    """A transformers model built on meta, its layers swapped for sharded ones by ``spec``'s
    tensor-parallel plan, every parameter filled from the checkpoint (a sharded one with its
    slice only) in ``dtype`` on ``device``, checked as ``_load_transformers_mapped`` checks."""
    from .weights import stored_shape

    if not spec.tensor_parallel_plan:
        raise ValueError(f"the {spec.what} ({spec.class_name}) has no tensor-parallel plan")
    model = _with_plan(tensor_parallel, spec.tensor_parallel_plan).apply(_meta_transformers_model(spec, folder))
    modules = dict(model.named_modules())
    shapes = {}  # each parameter's checkpoint shape (a shard's whole tensor)
    for name, p in model.named_parameters(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        shapes[name] = stored_shape(modules[owner], leaf, tuple(p.shape))
    dtype = dtype or torch.float32
    values: dict[str, torch.Tensor] = {}
    for path in find_weight_files(folder, stems=("model",)):
        with SafetensorsFile(path) as file:
            mapping = file.mapping()
            for entry in _checked_entries(spec, folder, file, shapes):
                owner, _, leaf = entry.key.rpartition(".")
                stored = file.view(mapping, entry)
                shard = getattr(modules[owner], "shards", {}).get(leaf)
                if shard is not None:
                    start, stop = shard.span(entry.shape[shard.dim])
                    stored = stored.narrow(shard.dim, start, stop - start)
                values[entry.key] = stored.to(device=device, dtype=dtype, copy=True)  # the slice only
            del mapping
    _set_parameters(spec, folder, model, values)
    return record_compute_dtype(model.eval().requires_grad_(False), dtype)


def _with_plan(tensor_parallel, plan):
    """``tensor_parallel`` (a ``parallel.tensor.TensorParallel``) with ``plan`` as its plan."""
    return type(tensor_parallel)(tensor_parallel.group, tensor_parallel.size, tensor_parallel.rank, plan)


def _stored_dtype(folder: Path) -> torch.dtype | None:
    """The one floating dtype of a transformers checkpoint's tensors (None: several or none)."""
    dtypes = set()
    for file in find_weight_files(folder, stems=("model",)):
        with SafetensorsFile(file) as st:
            dtypes |= {entry.dtype for entry in st.entries if entry.dtype.is_floating_point}
    return dtypes.pop() if len(dtypes) == 1 else None


def refuse_custom_code(config: dict[str, Any], path: Path) -> None:
    """No code from a model folder runs: a transformers config whose ``auto_map`` names classes
    of the folder's own .py files is refused, before transformers reads it (which would ask on
    a terminal whether to run them, or fail with a message of several lines)."""
    if "auto_map" in config:
        raise ModelLoadError(f"auto_map names custom code ({short_repr(config['auto_map'])}), which vidloom never "
                             "runs (allowed: no auto_map; the component loads through its transformers class)",
                             file=str(path))


def _refuse_custom_code_in(folder: Path, name: str) -> dict[str, Any]:
    """``refuse_custom_code`` for ``folder / name`` if it exists; its object, or {} if not."""
    path = folder / name
    if not path.exists():
        return {}
    config = read_json_object(path, name)
    refuse_custom_code(config, path)
    return config


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``exc`` as the one line a ModelLoadError quotes: its type and its text with the line breaks
    and runs of spaces of a library's message folded, cut to ``limit`` characters."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# the files a transformers tokenizer is read from (fast, sentencepiece, BPE, WordPiece)
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model", "sentencepiece.bpe.model", "vocab.json",
                   "vocab.txt")
# a tokenizer that states no length gets transformers' placeholder (int(1e30)); above this it is unset
UNSET_MAX_LENGTH = 10**9


def _plan_tokenizer(folder: Path):
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})", file=str(folder))
    facts = {"model_max_length": None}
    _refuse_custom_code_in(folder, "config.json")
    tokenizer_config = _refuse_custom_code_in(folder, "tokenizer_config.json")
    raw = tokenizer_config.get("model_max_length")
    if isinstance(raw, int) and not isinstance(raw, bool) and 1 <= raw < UNSET_MAX_LENGTH:
        facts["model_max_length"] = raw

    def load(device, dtype, map_weights, stored=False):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        except Exception as exc:
            raise ModelLoadError(f"tokenizer failed to load ({one_line(exc)})", file=str(folder)) from exc

    return facts, load


# What transformers' CLIP image processors take for a field that preprocessor_config.json leaves
# out (their class defaults); a processor of another type must state these fields itself.
CLIP_PROCESSOR_TYPES = ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil")
CLIP_PROCESSOR_DEFAULTS = {
    "do_resize": True, "size": {"shortest_edge": 224},
    "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
}
MAX_PROCESSOR_SIDE = 8192  # the largest image_size an image encoder may have (see _clip_vision)
# A resize before a center crop may exceed the crop by at most this factor per side (real
# processors: 224 -> 224, 256 -> 224): the whole image is resized before the crop, so a large
# resize costs memory per request for pixels the crop throws away.
MAX_RESIZE_PER_CROP = 2
PIL_RESAMPLE_FILTERS = range(6)  # NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """The checked ``preprocessor_config.json`` fields that decide what the image encoder is given.
    ``resize``: ("shortest_edge", (n,)) or ("height_width", (h, w)); ``crop``: (h, w)."""

    file: str
    do_resize: bool
    resize: tuple[str, tuple[int, ...]] | None  # None: no resize
    do_center_crop: bool
    crop: tuple[int, int] | None  # None: no crop

    def check_fits(self, image_size: int) -> None:
        """Every image must reach the encoder as ``image_size`` x ``image_size`` pixels: a center
        crop of that size (after a resize that covers it and is at most MAX_RESIZE_PER_CROP times
        larger), or else a resize to exactly that size."""
        side, crop = image_size, {"height": image_size, "width": image_size}
        if self.do_center_crop:
            if self.crop != (side, side):
                self._error("crop_size", f"{_size_text(self.crop)} is not the image encoder's image_size {side}",
                            json.dumps(crop))
            low, high = side, MAX_RESIZE_PER_CROP * side
            if self.do_resize and not all(low <= n <= high for n in self.resize[1]):
                self._error("size", f"{self._resize_text()}: the resize before the {side} px center crop must cover "
                            f"it and exceed it at most {MAX_RESIZE_PER_CROP}x", f'{{"shortest_edge": {low}..{high}}}')
            return
        fix = f'do_resize true with size {json.dumps(crop)}, or do_center_crop true with crop_size {json.dumps(crop)}'
        if not self.do_resize:
            self._error("do_resize", f"false with do_center_crop false: images would reach the image encoder at "
                        f"their own size, not its image_size {side}", fix)
        if self.resize != ("height_width", (side, side)):
            self._error("size", f"{self._resize_text()} without a center crop does not make every image {side}x{side} "
                        "(the image encoder's image_size)", fix)

    def _resize_text(self) -> str:
        kind, sides = self.resize
        return json.dumps({"shortest_edge": sides[0]} if kind == "shortest_edge"
                          else {"height": sides[0], "width": sides[1]})

    def _error(self, field: str, message: str, allowed: str) -> None:
        raise ModelLoadError(f"{field}: {message} (allowed: {allowed})", file=self.file)


def _size_text(hw: tuple[int, int]) -> str:
    return json.dumps({"height": hw[0], "width": hw[1]})


def _read_image_processor(data: dict[str, Any], path: Path) -> ImageProcessorConfig:
    """Check the fields of ``preprocessor_config.json`` that decide the pixels the encoder sees."""
    def fail(field: str, message: str, allowed: str):
        raise ModelLoadError(f"{field}: {message} (allowed: {allowed})", file=str(path))

    kind = data.get("image_processor_type", data.get("feature_extractor_type"))
    if not isinstance(kind, str):
        fail("image_processor_type", f"got {short_repr(kind)}", "a transformers image processor class name, "
             "e.g. CLIPImageProcessor")
    kind = kind.replace("FeatureExtractor", "ImageProcessor")
    defaults = CLIP_PROCESSOR_DEFAULTS if kind in CLIP_PROCESSOR_TYPES else {}

    def field(name: str):
        if name in data:
            return data[name]
        if name not in defaults:
            fail(name, f"missing, and a {short_repr(kind)} has no default vidloom knows", "the value, stated")
        return defaults[name]

    def side(name: str, value) -> int:
        if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_PROCESSOR_SIDE):
            fail(name, f"got {short_repr(value)}", f"an integer in 1..{MAX_PROCESSOR_SIDE}")
        return value

    flags = {}
    for name in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
        flags[name] = field(name)
        if not isinstance(flags[name], bool):
            fail(name, f"got {short_repr(flags[name])}", "true or false")
    resize, crop = None, None
    if flags["do_resize"]:
        size = field("size")
        size = {k: v for k, v in size.items() if v is not None} if isinstance(size, dict) else size
        if isinstance(size, dict) and set(size) == {"shortest_edge"}:
            resize = ("shortest_edge", (side("size.shortest_edge", size["shortest_edge"]),))
        elif isinstance(size, dict) and set(size) == {"height", "width"}:
            resize = ("height_width", (side("size.height", size["height"]), side("size.width", size["width"])))
        elif isinstance(size, int) and not isinstance(size, bool):  # the old form: the shortest edge
            resize = ("shortest_edge", (side("size", size),))
        else:
            fail("size", f"got {short_repr(size)}", '{"shortest_edge": n} or {"height": h, "width": w}')
    if flags["do_center_crop"]:
        crop_size = field("crop_size")
        if isinstance(crop_size, dict) and {k for k, v in crop_size.items() if v is not None} == {"height", "width"}:
            crop = (side("crop_size.height", crop_size["height"]), side("crop_size.width", crop_size["width"]))
        elif isinstance(crop_size, int) and not isinstance(crop_size, bool):  # the old form: a square
            crop = (side("crop_size", crop_size),) * 2
        else:
            fail("crop_size", f"got {short_repr(crop_size)}", '{"height": h, "width": w}')
    if flags["do_rescale"]:
        factor = field("rescale_factor")
        if not (_finite_number(factor) and factor > 0):
            fail("rescale_factor", f"got {short_repr(factor)}", "a finite number > 0, e.g. 1/255")
    if flags["do_normalize"]:
        for name in ("image_mean", "image_std"):
            value = field(name)
            if _finite_number(value):  # one number for the three channels
                values = [value]
            elif isinstance(value, list) and len(value) == 3 and all(_finite_number(v) for v in value):
                values = value
            else:
                fail(name, f"got {short_repr(value)}", "3 finite numbers, one per RGB channel")
            if name == "image_std" and not all(v > 0 for v in values):
                fail(name, f"got {short_repr(value)}: the pixels are divided by it", "numbers > 0")
    resample = data.get("resample")
    if resample is not None and not (isinstance(resample, int) and not isinstance(resample, bool)
                                     and resample in PIL_RESAMPLE_FILTERS):
        fail("resample", f"got {short_repr(resample)}", "a PIL filter number, 0..5 (3: bicubic)")
    return ImageProcessorConfig(str(path), flags["do_resize"], resize, flags["do_center_crop"], crop)


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _plan_image_processor(folder: Path):
    path = folder / "preprocessor_config.json"
    data = read_json_object(path, "preprocessor_config.json")
    refuse_custom_code(data, path)
    _refuse_custom_code_in(folder, "config.json")
    facts = _read_image_processor(data, path)

    def load(device, dtype, map_weights, stored=False):
        from transformers import AutoImageProcessor

        try:
            return AutoImageProcessor.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        except Exception as exc:
            raise ModelLoadError(f"image processor failed to load ({one_line(exc)})", file=str(folder)) from exc

    return facts, load


def _plan_scheduler(folder: Path):
    from ..schedulers import scheduler_from_config

    path = folder / "scheduler_config.json"
    try:
        scheduler = scheduler_from_config(read_json_object(path, "scheduler_config.json"))
    except ValueError as exc:
        raise ModelLoadError(f"unsupported scheduler config ({exc})", file=str(path)) from exc
    return scheduler.config, lambda device, dtype, map_weights, stored=False: scheduler


# (library, class name) -> planner(folder) -> (config, load)
MODEL_PLANNERS: dict[tuple[str, str], Callable] = {
    ("diffusers", "WanTransformer3DModel"): _plan_dit,
    ("diffusers", "AutoencoderKLWan"): _plan_vae,
    ("transformers", "UMT5EncoderModel"): functools.partial(_plan_transformers_model, UMT5),
    ("transformers", "CLIPVisionModel"): functools.partial(_plan_transformers_model, _clip_vision("CLIPVisionModel")),
    ("transformers", "CLIPVisionModelWithProjection"):
        functools.partial(_plan_transformers_model, _clip_vision("CLIPVisionModelWithProjection")),
    ("diffusers", "UniPCMultistepScheduler"): _plan_scheduler,
    ("diffusers", "FlowMatchEulerDiscreteScheduler"): _plan_scheduler,
}


def _planner(library: str, class_name: str) -> Callable | None:
    planner = MODEL_PLANNERS.get((library, class_name))
    if planner is None and library == "transformers":
        if class_name.endswith(("Tokenizer", "TokenizerFast")) or class_name == "TokenizersBackend":
            planner = _plan_tokenizer
        elif "ImageProcessor" in class_name:  # CLIPImageProcessor, ...Fast, ...Pil (transformers 5)
            planner = _plan_image_processor
    return planner
