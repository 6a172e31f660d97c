"""A model folder checked whole before any weight is read (``plan_folder``), and its components
loaded from the plan (``load_components``).

The folder's pipeline class (by ``_class_name``) reads the variant from ``model_index.json``; the
variant says which components it loads, checks that their configs fit together and gives the
request limits. A refine model (``EngineConfig.refine_model``) is a second folder planned the same
way, whose transformers and scheduler run the refine pass."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from ..config import EngineConfig, RequestLimits
from ..errors import ModelLoadError
from .components import ComponentPlan, component_spec, plan_component, read_model_index

log = logging.getLogger(__name__)

# component name -> which resolved dtype it takes (tokenizer and scheduler take none)
COMPONENT_DTYPE = {"transformer": "transformer", "transformer_2": "transformer", "text_encoder": "text_encoder",
                   "vae": "vae", "image_encoder": "image_encoder"}

# what a refine model folder contributes: the rest (text encoder, VAE) is the base folder's
REFINE_COMPONENTS = ("transformer", "transformer_2", "scheduler")


class Variant(Protocol):
    """What the planner asks of a pipeline's variant record (``pipelines/wan_variant.py``)."""

    def components(self) -> tuple[str, ...]: ...

    def optional_components(self) -> tuple[str, ...]: ...

    def unused_reason(self, name: str) -> str | None: ...

    def fit(self, configs: dict[str, Any], engine: EngineConfig, index_file: str) -> "Variant": ...

    def request_limits(self, configs: dict[str, Any], engine: EngineConfig) -> RequestLimits: ...


@dataclasses.dataclass(frozen=True)
class RefinePlan:
    """A refine model folder: the components it contributes, and its variant."""

    path: Path
    plans: dict[str, ComponentPlan]
    variant: Any


@dataclasses.dataclass(frozen=True)
class FolderPlan:
    """A folder checked whole: its pipeline class, variant, component plans and the limits of a
    request (both models' limits with a refine model)."""

    path: Path
    pipeline: type
    variant: Any
    plans: dict[str, ComponentPlan]
    limits: RequestLimits
    refine: RefinePlan | None = None
    calibration: Any = None  # the folder's feature-cache calibration (``cache.calibrate``), or None

    def transformer_heads(self) -> list[int]:
        """The attention heads of every transformer the plan loads (for the parallel layout check)."""
        sets = [self.plans] + ([self.refine.plans] if self.refine else [])
        return [plans[name].config.num_attention_heads for plans in sets
                for name in ("transformer", "transformer_2") if name in plans]

    def text_encoder_heads(self) -> int | None:
        """The text encoder's attention heads (UMT5's ``num_heads``), None where it has none."""
        plan = self.plans.get("text_encoder")
        heads = plan.config.get("num_heads") if plan is not None and isinstance(plan.config, dict) else None
        return heads if isinstance(heads, int) else None


def pipeline_for(index: dict[str, Any], path: Path) -> type:
    from ..pipelines import pipeline_class, registered_pipelines

    try:
        return pipeline_class(index["_class_name"])
    except KeyError:
        raise ModelLoadError(
            f"unsupported pipeline {index['_class_name']!r} (supported: {', '.join(sorted(registered_pipelines()))})",
            file=str(path / "model_index.json"),
        ) from None


def read_variant(path: Path):
    """The pipeline class and variant ``model_index.json`` states, its settings checked."""
    index = read_model_index(path)
    pipe_cls = pipeline_for(index, path)
    return pipe_cls, pipe_cls.read_variant(index, str(path / "model_index.json")), index


def plan_folder(path: str | Path, config: EngineConfig) -> FolderPlan:
    """Check a whole model folder before any weight is read: the index and its variant, every
    component's folder, config and weight headers, and that the components fit together; with
    ``config.refine_model``, that folder too and that it fits this one."""
    path = Path(path)
    plan = _plan_one(path, config)
    if config.refine_model is None:
        return plan
    refine = _plan_one(Path(config.refine_model), config)
    index_file = str(Path(config.refine_model) / "model_index.json")
    if refine.limits.image not in ("none", "optional"):
        raise ModelLoadError("refine_model: an image-to-video folder cannot run a text-to-video refine pass",
                             file=index_file)
    plan.pipeline.check_refine({n: p.config for n, p in plan.plans.items()},
                               {n: p.config for n, p in refine.plans.items()}, index_file)
    sides = [s for s in (plan.limits.max_grid_side, refine.limits.max_grid_side) if s is not None]
    blocks = [b for b in (plan.limits.transformer_blocks, refine.limits.transformer_blocks) if b is not None]
    limits = dataclasses.replace(plan.limits, max_grid_side=min(sides) if sides else None,
                                 max_steps=min(plan.limits.max_steps, refine.limits.max_steps),
                                 transformer_blocks=min(blocks) if blocks else None)
    contributed = {name: p for name, p in refine.plans.items() if name in REFINE_COMPONENTS}
    return dataclasses.replace(plan, limits=limits, refine=RefinePlan(refine.path, contributed, refine.variant))


def _plan_one(path: Path, config: EngineConfig) -> FolderPlan:
    pipe_cls, variant, index = read_variant(path)
    index_file = path / "model_index.json"
    required = variant.components()
    required += tuple(name for name in variant.optional_components()
                      if isinstance(index.get(name), list) and index[name] != [None, None])
    for name, spec in index.items():
        if name.startswith("_") or name in required or not isinstance(spec, list) or spec == [None, None]:
            continue
        reason = variant.unused_reason(name)
        if reason is not None:
            raise ModelLoadError(f"component '{name}' is given but the settings never use it ({reason})",
                                 file=str(index_file))
        raise ModelLoadError(f"component '{name}' is not supported by this pipeline yet", file=str(index_file))
    specs = {name: component_spec(index, name, index_file) for name in required}
    missing = [name for name, spec in specs.items() if spec is None]
    if missing:
        raise ModelLoadError(f"model_index.json lacks required component(s) {missing}", file=str(index_file))
    plans = {name: plan_component(path, name, spec) for name, spec in specs.items()}
    configs = {name: plan.config for name, plan in plans.items()}
    variant = variant.fit(configs, config, str(index_file))
    from ..cache.calibrate import read_calibration

    return FolderPlan(path, pipe_cls, variant, plans, variant.request_limits(configs, config),
                      calibration=read_calibration(path))


def load_components(plans: dict[str, ComponentPlan], config: EngineConfig, residency, prefix: str = "",
                    parallel=None) -> None:
    """Give the residency policy (``memory.residency``) every planned component, names prefixed
    with ``prefix``: tokenizers, schedulers and image processors loaded now; the models (the
    transformers, text and image encoders, VAE) as plans, each loaded in its resolved dtype when
    the policy decides (with the engine, or at its first use). Under tensor parallelism
    (``parallel.tp_size > 1``) the transformers and the text encoder are loaded sharded
    (``parallel.tensor``)."""
    from ..memory.residency import Planned

    dtypes = config.resolved_dtypes()
    small, models = {}, {}
    for name, plan in plans.items():
        if name not in COMPONENT_DTYPE:
            small[name] = plan.load(residency.load_device(prefix + name), torch.float32, config.map_weights)
            continue
        dtype = dtypes[COMPONENT_DTYPE[name]]
        extra = ()
        if parallel is not None and parallel.tp_size > 1 and COMPONENT_DTYPE[name] in ("transformer", "text_encoder"):
            from ..parallel.tensor import TensorParallel

            extra = (TensorParallel(parallel.tp_group, parallel.tp_size, parallel.tp_rank),)
        compiled = config.compile and COMPONENT_DTYPE[name] == "transformer"
        quantize = {"transformer": config.quantize, "text_encoder": config.quantize_text_encoder}.get(
            COMPONENT_DTYPE[name])
        loras = {"transformer": config.loras, "transformer_2": config.loras_2}.get(name, ()) \
            if not prefix and config.lora_mode == "merged" else ()
        models[name] = Planned(plan.config, dtype, plan.class_name,
                               _loader(plan, dtype, config.map_weights,
                                       stored_blocks(config.low_mem_level or 0, dtype, quantize),
                                       config.low_mem_level or 0, extra, compiled, (loras, config.lora_ignore),
                                       quantize))
    residency.add(small, prefix)
    residency.add_planned(models, prefix)


def stored_blocks(level: int, dtype: torch.dtype, quantize: str | None = None) -> bool:
    """Whether models loaded at memory ``level`` keep their blocks' checkpoint dtype
    (``loader.stored``): from level 2, and whenever their blocks are quantized, for components
    computing in float32 (bf16 checkpoints are then never widened whole: quantizing reads each
    weight from the mapped file as stored)."""
    from ..memory.levels import ONE_COMPONENT

    return (level >= ONE_COMPONENT or quantize is not None) and dtype == torch.float32


def _loader(plan: ComponentPlan, dtype: torch.dtype, map_weights: bool, stored: bool,
            level: int, extra: tuple = (), compiled: bool = False,
            loras: tuple = ((), ()), quantize: str | None = None) -> Callable[[torch.device], Any]:
    """``plan``'s loader; a model with mapped blocks releases their pages after each block runs
    while the work runs at memory level 3 (``level``: the engine's; a unit may run higher).
    ``compiled``: its blocks compiled instead (``models.compiled``; they are not streamed).
    ``loras``: ((file, scale) pairs, keys to ignore) merged into it (``vidloom.lora``);
    ``quantize``: its blocks' Linear weights then stored as int8 / fp8 (``vidloom.quant``)."""
    from ..memory.levels import STREAMING_BLOCKS, level_now
    from .stored import stream_blocks

    def load(device: torch.device):
        log.info("loading %s (%s.%s) as %s%s", plan.name, plan.library, plan.class_name, dtype,
                 ", blocks as stored" if stored else "")
        module = plan.load(device, dtype, map_weights, stored=stored, **({"extra": extra} if extra else {}))
        if loras[0]:  # merged into the weights before anything else sees them
            from ..lora import merge_loras

            merge_loras(module, loras[0], loras[1])
        if quantize is not None:  # after merging: the adapters are quantized with the weights
            from ..quant import quantize_blocks

            quantize_blocks(module, quantize)
        if compiled:
            from ..models.compiled import compile_blocks

            return compile_blocks(module)
        stream_blocks(module, lambda: level_now(level) >= STREAMING_BLOCKS)
        return module

    return load
