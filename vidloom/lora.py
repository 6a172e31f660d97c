"""LoRA adapters for the Wan transformer, from the files users have, merged into the weights.

Formats, told apart by their keys (safetensors only):

- diffusers / PEFT (``WanPipeline.save_lora_weights``): ``transformer.blocks.0.attn1.to_q.lora_A.weight``
  and ``lora_B``, diffusers' module names; ``lora_alpha`` and ``r`` (and their per-module
  patterns) from the file's ``lora_adapter_metadata``, else alpha = r (scale 1).
- LightX2V / ComfyUI: ``diffusion_model.blocks.0.self_attn.q.lora_A.weight`` (or ``lora_down`` /
  ``lora_up``, an optional ``.alpha``), the original Wan module names, plus full deltas:
  ``.diff`` (W += diff), ``.diff_b`` (b += diff_b) and ``.diff_m`` (a block's modulation table).
- kohya / musubi: ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` / ``lora_up`` / ``alpha``,
  the module path with underscores (original Wan names, or diffusers').

Every key must name a module of the model (by any of its three names); a key that matches
nothing is an error naming it, unless it is listed in ``ignore``. Keys for image-conditioning
modules a text-to-video folder lacks are reported (``LoraReport.absent``) and skipped.

A low-rank pair adds ``scale * (alpha / r) * up @ down`` to the weight; a full delta adds
``scale * diff``; stacked adapters add. Merging computes in float32 and writes a new tensor for
each affected parameter (never into the mapped file's pages), cast back to the parameter's dtype;
a tensor-parallel shard takes its slice of the delta.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import logging
import math
import re
from pathlib import Path

import torch

from .errors import VidloomError
from .loader.weights import SafetensorsFile, param_to_checkpoint_name, _rename
from .quant import QuantizedLinear

log = logging.getLogger(__name__)

MAX_LORA_BYTES = 8 << 30  # a LoRA file larger than this is refused before reading
_SUFFIXES = (  # (key suffix, part)
    (".lora_A.weight", "down"), (".lora_down.weight", "down"),
    (".lora_B.weight", "up"), (".lora_up.weight", "up"),
    (".lora_B.bias", "bias"), (".alpha", "alpha"),
    (".diff_b", "bias"), (".diff_m", "modulation"), (".diff", "full"),
)
_PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.", "model.diffusion_model.", "lora_unet_")


class LoraError(VidloomError, ValueError):
    """A LoRA file that cannot be applied: the key or the reason named."""


@dataclasses.dataclass
class LoraReport:
    """What one adapter did: its format, the parameters it changed, and the keys skipped because
    the model lacks their module (image keys on a text-to-video folder)."""

    path: str
    format: str
    changed: list[str] = dataclasses.field(default_factory=list)
    absent: list[str] = dataclasses.field(default_factory=list)
    ignored: list[str] = dataclasses.field(default_factory=list)


def parse_lora_option(value: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` (CLI) -> (file, scale); no scale means 1.0."""
    path, sep, scale = value.rpartition(":")
    if sep and path and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", scale):
        return path, float(scale)
    return value, 1.0


ADAPTER_FOLDER = "lora"  # a model folder's named adapters: <folder>/lora/<name>.safetensors
SAMPLING_KEY = "vidloom_sampling"  # an adapter's metadata field: the settings it was trained for
_SAMPLING_FIELDS = {"num_inference_steps": (int, 1, 1000), "guidance_scale": (float, 0.0, 100.0),
                    "flow_shift": (float, 1e-3, 1000.0)}


def folder_adapters(model_dir: str | Path) -> dict[str, Path]:
    """The adapters a model folder carries, by name (``lora/<name>.safetensors``)."""
    folder = Path(model_dir) / ADAPTER_FOLDER
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.safetensors")) if p.is_file()}


def resolve_lora(value: str | Path, model_dir: str | Path) -> str:
    """A LoRA file's path: ``value`` itself when it is a file, else the model folder's adapter of
    that name (``--lora distill-4step``); LoraError naming both when it is neither."""
    if Path(value).is_file():
        return str(value)
    named = folder_adapters(model_dir)
    if str(value) in named:
        return str(named[str(value)])
    shipped = f", nor an adapter of the model folder ({', '.join(named)})" if named else ""
    raise LoraError(f"no LoRA file at {value}{shipped}")


def adapter_sampling(path: str | Path) -> dict:
    """The request settings an adapter file says it was trained for (``vidloom_sampling`` in its
    metadata: steps, guidance scale, flow shift), checked; {} when it gives none."""
    with SafetensorsFile(Path(path)) as file:
        raw = (file.metadata or {}).get(SAMPLING_KEY)
    if raw is None:
        return {}
    try:
        given = json.loads(raw)
    except ValueError as exc:
        raise LoraError(f"LoRA file {path}: {SAMPLING_KEY} is not JSON ({exc})") from exc
    if not isinstance(given, dict) or not set(given) <= set(_SAMPLING_FIELDS):
        raise LoraError(f"LoRA file {path}: {SAMPLING_KEY} must be an object with fields among "
                        f"{', '.join(_SAMPLING_FIELDS)}")
    out = {}
    for key, value in given.items():
        kind, low, high = _SAMPLING_FIELDS[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high \
                or (kind is int and value != int(value)):
            raise LoraError(f"LoRA file {path}: {SAMPLING_KEY}.{key} = {value!r}, expected "
                            f"{'an integer' if kind is int else 'a number'} in {low:g}..{high:g}")
        out[key] = kind(value)
    return out


def detect_format(keys: list[str]) -> str:
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(k.startswith(("diffusion_model.", "model.diffusion_model.")) for k in keys):
        return "lightx2v"
    return "diffusers"


def _module_aliases(model: torch.nn.Module) -> dict[str, str]:
    """Every name a LoRA file may give a module of ``model`` (ours, diffusers', the original
    Wan one, and their kohya underscore forms) -> our module name."""
    cls = type(model)
    aliases: dict[str, str] = {}
    for name, _ in model.named_modules():
        diffusers = param_to_checkpoint_name(cls, f"{name}.weight").removesuffix(".weight") if name else ""
        original = _rename(diffusers, getattr(cls, "original_key_map", ())) if name else ""
        for alias in {name, diffusers, original}:
            aliases.setdefault(alias, name)
            aliases.setdefault(alias.replace(".", "_"), name)
    aliases.setdefault("head", "")  # the original name of the output head's modulation owner
    return aliases


def _split(key: str) -> tuple[str, str] | None:
    """A file key -> (module path without format prefix, part), None for an unknown suffix."""
    for suffix, part in _SUFFIXES:
        if key.endswith(suffix):
            path = key[: -len(suffix)]
            for prefix in _PREFIXES:
                if path.startswith(prefix):
                    path = path[len(prefix):]
                    break
            return path, part
    return None


def _metadata_scales(metadata: dict[str, str]):
    """(r, lora_alpha, rank_pattern, alpha_pattern) from diffusers' ``lora_adapter_metadata``."""
    raw = metadata.get("lora_adapter_metadata")
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
        # diffusers prefixes each field with the component ("transformer.lora_alpha")
        meta = {key.removeprefix("transformer."): value for key, value in meta.items()}
    except (ValueError, AttributeError) as exc:
        raise LoraError(f"lora_adapter_metadata is not a JSON object ({exc})") from exc
    r, alpha = meta.get("r"), meta.get("lora_alpha")
    patterns = [meta.get("rank_pattern") or {}, meta.get("alpha_pattern") or {}]
    numbers = [v for v in (r, alpha) if v is not None] + [v for p in patterns if isinstance(p, dict) for v in p.values()]
    if not all(isinstance(p, dict) for p in patterns) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1e6 for v in numbers):
        raise LoraError("lora_adapter_metadata: r, lora_alpha and their patterns must be positive numbers")
    return r, alpha, patterns[0], patterns[1]


def _pattern_value(patterns: dict, module: str, default):
    """A per-module value of a PEFT pattern table, matched by the module's name or its ending
    (no regular expressions: the file's text is not run as one)."""
    for pattern, value in patterns.items():
        if module == pattern or module.endswith("." + pattern):
            return value
    return default


def read_lora(path: str | Path, model: torch.nn.Module, ignore: tuple[str, ...] = ()):
    """The deltas of the LoRA file at ``path`` for ``model``: ({our parameter name: its ``Term``s at
    scale 1}, LoraReport). Every key checked before a delta is computed."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise LoraError(f"LoRA file {path}: cannot read it ({exc.strerror})") from exc
    if path.suffix != ".safetensors":
        raise LoraError(f"LoRA file {path}: only .safetensors files are read")
    if size > MAX_LORA_BYTES:
        raise LoraError(f"LoRA file {path}: {size} bytes, more than {MAX_LORA_BYTES}")
    aliases = _module_aliases(model)
    modules = dict(model.named_modules())
    # the image modules' names in every naming (kohya's underscores included)
    image_fragments = {f for m in getattr(type(model), "image_modules", ()) for name in (m.strip("."),)
                       for f in (name, name.replace(".", "_"))} | {"k_img", "v_img", "img_emb"}
    with SafetensorsFile(path) as file:
        keys = [e.key for e in file.entries]
        report = LoraReport(str(path), detect_format(keys))
        meta = _metadata_scales(file.metadata)
        groups: dict[str, dict[str, str]] = {}  # our module -> part -> key
        for key in keys:
            if key in ignore:
                report.ignored.append(key)
                continue
            split = _split(key)
            module = aliases.get(split[0]) if split else None
            if split is None or module is None:
                if split is not None and any(fragment in split[0] for fragment in image_fragments):
                    report.absent.append(key)
                    continue
                raise LoraError(f"LoRA file {path}: key {key!r} matches no module of the "
                                f"{type(model).__name__} (pass it in ignore to skip it)")
            part = split[1]
            groups.setdefault(module, {})
            if part in groups[module]:
                raise LoraError(f"LoRA file {path}: key {key!r} repeats {groups[module][part]!r}")
            groups[module][part] = key
        if report.absent:
            log.warning("LoRA %s: %d key(s) for modules this model lacks skipped, first %s", path, len(report.absent),
                        report.absent[0])
        mapping = file.mapping()
        tensors = {e.key: file.view(mapping, e) for e in file.entries}
        deltas: dict[str, list] = {}  # our parameter -> its terms (see ``Term``)
        for module_name, parts in groups.items():
            module = modules[module_name]

            def tensor(part, parts=parts):
                return tensors[parts[part]].to(torch.float32, copy=True)  # its own memory, not the file's

            if "down" in parts or "up" in parts:
                if "down" not in parts or "up" not in parts:
                    missing = "up" if "down" in parts else "down"
                    raise LoraError(f"LoRA file {path}: {next(iter(parts.values()))!r} has no {missing} matrix")
                down, up = tensor("down"), tensor("up")
                if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
                    raise LoraError(f"LoRA file {path}: {parts['down']!r} and {parts['up']!r} are not a (r, in), "
                                    f"(out, r) pair: {tuple(down.shape)}, {tuple(up.shape)}")
                rank = down.shape[0]
                if "alpha" in parts:
                    stored = tensors[parts["alpha"]]
                    if stored.numel() != 1 or not bool(torch.isfinite(stored.float()).all()):
                        raise LoraError(f"LoRA file {path}: {parts['alpha']!r} is not one finite number")
                    alpha = float(stored.float().reshape(-1)[0])
                elif meta is not None and report.format == "diffusers":
                    diffusers_name = param_to_checkpoint_name(type(model), f"{module_name}.weight").removesuffix(
                        ".weight")
                    r = _pattern_value(meta[2], diffusers_name, meta[0] or rank)
                    alpha = _pattern_value(meta[3], diffusers_name, meta[1] if meta[1] is not None else r)
                    rank = r
                else:
                    alpha = rank
                _add(deltas, module_name + ".weight", Term(up, down, alpha / rank), module, path, parts["up"])
            elif "alpha" in parts:
                raise LoraError(f"LoRA file {path}: {parts['alpha']!r} has no low-rank pair")
            if "full" in parts:
                _add(deltas, module_name + ".weight", Term(tensor("full")), module, path, parts["full"])
            if "bias" in parts:
                _add(deltas, module_name + ".bias", Term(tensor("bias")), module, path, parts["bias"])
            if "modulation" in parts:
                _add(deltas, (module_name + "." if module_name else "") + "scale_shift_table", Term(tensor("modulation")),
                     module, path, parts["modulation"])
    report.changed = sorted(deltas)
    return deltas, report


@dataclasses.dataclass
class Term:
    """One term of a parameter's delta at scale 1: ``factor * up @ down`` (a low-rank pair: up
    (out, r), down (r, in)), or ``up`` itself (a full delta, ``down`` None), float32."""

    up: torch.Tensor
    down: torch.Tensor | None = None
    factor: float = 1.0

    def dense(self) -> torch.Tensor:
        return self.up if self.down is None else self.factor * (self.up @ self.down)


def _add(deltas: dict, name: str, term: Term, module: torch.nn.Module, path, key: str) -> None:
    leaf = name.rpartition(".")[2]
    base = module.base if isinstance(module, AdaptedLinear) else module
    # a quantized layer's weight has the shape of its int8/fp8 values
    param = base.qweight if isinstance(base, QuantizedLinear) and leaf == "weight" else getattr(base, leaf, None)
    if not isinstance(param, torch.Tensor):
        raise LoraError(f"LoRA file {path}: key {key!r}: the module has no {leaf}")
    shard = getattr(module, "shards", {}).get(leaf)
    full = list(param.shape)
    if shard is not None:
        full[shard.dim] *= shard.count
    shape = (term.up.shape[0], term.down.shape[1]) if term.down is not None else tuple(term.up.shape)
    if math.prod(shape) != math.prod(full) or (term.down is not None and list(shape) != full):
        raise LoraError(f"LoRA file {path}: key {key!r} gives a delta of {tuple(shape)} for {name} of {tuple(full)}")
    if term.down is None:
        term = Term(term.up.reshape(full))
    if shard is not None:  # this process's slice: rows of up (output features) or columns of down (inputs)
        start, stop = shard.span(full[shard.dim])
        if term.down is None:
            term = Term(term.up.narrow(shard.dim, start, stop - start))
        elif shard.dim == 0:
            term = Term(term.up[start:stop], term.down, term.factor)
        else:
            term = Term(term.up, term.down[:, start:stop], term.factor)
    deltas.setdefault(name, []).append(term)


def merge_loras(model: torch.nn.Module, loras, ignore: tuple[str, ...] = ()) -> list[LoraReport]:
    """Fold each (file, scale) of ``loras`` into ``model``'s weights; returns their reports. Each
    changed parameter: widened to float32 once, every term added in place (a low-rank one by one
    addmm), written once in its dtype and layout into a new tensor."""
    scaled: dict[str, list[tuple[float, Term]]] = {}
    reports = []
    for path, scale in loras:
        deltas, report = read_lora(path, model, ignore)
        for name, terms in deltas.items():
            scaled.setdefault(name, []).extend((scale, term) for term in terms)
        reports.append(report)
        log.info("LoRA %s (%s, scale %g): %d tensors changed", path, report.format, scale, len(report.changed))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, terms in scaled.items():
            param = params[name]
            merged = param.detach().to(torch.float32, copy=True)
            flat = merged.view(merged.shape[0], -1) if merged.ndim > 1 else merged
            for scale, term in terms:
                if term.down is None:
                    merged.add_(term.up.to(merged.device).reshape(merged.shape), alpha=scale)
                else:
                    flat.addmm_(term.up.to(merged.device), term.down.to(merged.device), alpha=scale * term.factor)
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            # a new tensor in the parameter's own layout (the old one may be a view of the mapped file)
            fresh = torch.empty_strided(param.shape, param.stride(), dtype=param.dtype, device=param.device)
            fresh.copy_(merged)
            module._parameters[leaf] = torch.nn.Parameter(fresh, requires_grad=False)
    return reports


# -- unmerged adapters: applied in the forward, chosen per request (per block of rows) ----------

# ((start, stop, ((adapter name, scale), ...)), ...): the rows of the forward's batch and the
# adapters each block of rows uses (stop None: to the end); None: no adapter
_ROWS: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("lora_rows", default=None)


@contextlib.contextmanager
def adapters_for_rows(spans: tuple | None):
    """Make ``spans`` the adapters of the forwards inside the block (see ``_ROWS``)."""
    token = _ROWS.set(spans or None)
    try:
        yield
    finally:
        _ROWS.reset(token)


class AdaptedLinear(torch.nn.Module):
    """A Linear whose output gains, on the rows that ask for them, the low-rank (or full) deltas of
    named adapters: y[rows] += scale * (factor * x[rows] @ down^T @ up^T + bias delta), computed in
    the factors' dtype (the layer's). The base layer is kept as it is (its weights are not touched)."""

    def __init__(self, base: torch.nn.Linear):
        super().__init__()
        self.base = base
        self.terms: dict[str, list[Term]] = {}  # adapter -> weight terms
        self.bias_terms: dict[str, torch.Tensor] = {}  # adapter -> bias delta

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        spans = _ROWS.get()
        if spans is None:
            return y
        for start, stop, chosen in spans:
            for name, scale in chosen:
                terms, bias = self.terms.get(name, ()), self.bias_terms.get(name)
                if not terms and bias is None:
                    continue
                xs = x[start:stop]
                update = 0
                for term in terms:
                    xt = xs.to(term.up.dtype)
                    part = xt @ term.up.t() if term.down is None else (xt @ term.down.t()) @ term.up.t()
                    update = update + (scale * term.factor) * part
                if bias is not None:
                    update = update + scale * bias
                y[start:stop] += update.to(y.dtype)
        return y


def attach_adapter(model: torch.nn.Module, name: str, deltas: dict[str, list[Term]], path) -> None:
    """Give ``model``'s Linear layers adapter ``name``'s terms (from ``read_lora``), each Linear
    wrapped in an ``AdaptedLinear`` the first time an adapter touches it."""
    for param_name, terms in deltas.items():
        owner, _, leaf = param_name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if leaf not in ("weight", "bias") or not isinstance(
                module, (torch.nn.Linear, QuantizedLinear, AdaptedLinear)):
            raise LoraError(f"LoRA file {path}: its delta of {param_name} applies only merged (lora_mode='merged'): "
                            "unmerged adapters change Linear layers")
        if not isinstance(module, AdaptedLinear):  # a Linear, or a quantized one (the update added in full precision)
            parent_name, _, child = owner.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            module = AdaptedLinear(module)
            setattr(parent, child, module)
        # kept in the layer's compute dtype (bf16 factors for a bf16 layer: its update then costs
        # bf16 matmuls; float32 for a float32 layer, exact as the merged delta)
        base = module.base
        device = next(base.parameters()).device
        dtype = getattr(base, "compute_dtype", None) or base.weight.dtype
        moved = [Term(t.up.to(device, dtype), None if t.down is None else t.down.to(device, dtype), t.factor)
                 for t in terms]
        if leaf == "weight":
            module.terms.setdefault(name, []).extend(moved)
        else:
            bias = sum(t.dense() for t in moved)
            module.bias_terms[name] = module.bias_terms[name] + bias if name in module.bias_terms else bias


def detach_adapter(model: torch.nn.Module, name: str) -> None:
    """Drop adapter ``name`` from every layer of ``model`` (the wrapped layers stay wrapped)."""
    for module in model.modules():
        if isinstance(module, AdaptedLinear):
            module.terms.pop(name, None)
            module.bias_terms.pop(name, None)
