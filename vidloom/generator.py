"""``VideoGenerator``: load a Diffusers folder, generate videos, advance tasks step by step."""

from __future__ import annotations

import collections
import dataclasses
import enum
import itertools
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import EngineConfig, RequestLimits, SamplingParams
from .parallel.state import check_layout, world_size_from_env
from .errors import (AdaptersBusy, InvalidRequestError, ModelLoadError, TaskCancelled, VidloomError, engine_error,
                     is_out_of_memory)
from .loader.plan import load_components, plan_folder
from .loader.weights import changed_mapped_files
from .memory import residency_for
from .memory.budget import engine_level, request_level
from .memory.levels import unit_level
from .memory.recovery import run_again_higher
from .models.attention import AttentionContext, attention_context, engine_backend
from .models.sliding_tile import parse_window
from .profiling import stage_range
from .pipelines.base import ComposedPipeline, Cursor, Phase, WorkUnit, run_units
from .pipelines.batch import ForwardBatch
from .request import CheckedRequest, checked_requests

log = logging.getLogger(__name__)

# where an "mp4" request without an output_path is written (relative to the working directory)
DEFAULT_OUTPUT_DIR = Path("outputs")

StepCallback = Callable[[int, int, float, torch.Tensor], None]  # (step, total, timestep, latents)


class TaskState(str, enum.Enum):
    QUEUED = "queued"
    ENCODING = "encoding"
    DENOISING = "denoising"
    DECODING = "decoding"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


_PHASE_STATES = {Phase.ENCODING: TaskState.ENCODING, Phase.DENOISING: TaskState.DENOISING,
                 Phase.DECODING: TaskState.DECODING}


@dataclass
class VideoOutput:
    """``frames``: (T, H, W, 3) float32 in [0, 1] (numpy for "np"/"mp4", torch for "pt", None for "latent")."""

    frames: np.ndarray | torch.Tensor | None
    latents: torch.Tensor  # final latents (B, C, F, H, W), normalised as the DiT sees them
    params: SamplingParams
    path: Path | None = None
    trajectory_latents: list[torch.Tensor] = field(default_factory=list)
    trajectory_frames: list[np.ndarray] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    # what the request's feature cache did (``SamplingParams.cache``; empty without one): transformer
    # branch evaluations ``forwards``, ``blocks_computed`` / ``blocks_skipped``, ``uncond_skipped``,
    # and ``estimated_change``, the policy's own estimate of the change it skipped over
    cache: dict[str, float] = field(default_factory=dict)


@dataclass(eq=False)
class Task:
    """One request advanced by ``VideoGenerator.step``; shares only read-only modules with others."""

    id: str
    params: SamplingParams
    batch: ForwardBatch
    total_units: int
    callback: StepCallback | None = None
    state: TaskState = TaskState.QUEUED
    units_done: int = 0
    error: BaseException | None = None
    result: VideoOutput | None = None
    created: float = field(default_factory=time.time)
    cursor: Cursor = (0, 0)  # where the next unit of work is (``ComposedPipeline.unit_at``)
    memory_level: int = 0  # the memory level its units run at (raised by out-of-memory recovery)
    _cancel_requested: bool = False

    @property
    def progress(self) -> float:
        return 1.0 if self.state == TaskState.DONE else self.units_done / max(self.total_units + 1, 1)

    @property
    def is_finished(self) -> bool:
        return self.state in (TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED)

    @property
    def timings(self) -> dict[str, float]:
        return dict(self.batch.timings)

    @property
    def status(self) -> str:
        if self.state == TaskState.DENOISING:
            return f"denoising {self.batch.step_index}/{self.batch.num_steps}"
        return self.state.value

    def cancel(self) -> None:
        """Stop the task before its next unit of work; a finished task is left as it is."""
        if not self.is_finished:
            self._cancel_requested = True


# videos one call may ask for (prompts x num_videos_per_prompt): one step-batched group
MAX_VIDEOS_PER_CALL = 64


@dataclass(frozen=True)
class VideoRequest:
    """One video of a several-video call: its prompt, seed and output path."""

    prompt: Any
    seed: Any
    output_path: Any


def video_requests(prompt, num_videos_per_prompt: int = 1, seed: Any = SamplingParams.seed,
                   output_path: Any = None) -> list[VideoRequest]:
    """The videos a call asks for, as diffusers' pipelines count them: ``prompt`` a str or a
    list of them, ``num_videos_per_prompt`` videos each, in order (a prompt's videos
    together), with seeds ``seed, seed + 1, ...`` (the same for every prompt). With several
    videos, video ``k`` (from 0) goes to ``output_path`` with ``-k`` after its name:
    ``clip.mp4`` gives ``clip-0.mp4, clip-1.mp4, ...``, a PNG folder ``frames`` gives
    ``frames-0, ...``. The count is checked here (InvalidRequestError naming the field);
    each video's own fields are checked as its request."""
    from .errors import InvalidRequestError

    prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt]
    n = num_videos_per_prompt
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InvalidRequestError("num_videos_per_prompt", f"got {n!r}", "an integer >= 1")
    if not prompts:
        raise InvalidRequestError("prompt", "an empty list", "a string or a non-empty list of strings")
    if len(prompts) * n > MAX_VIDEOS_PER_CALL:
        raise InvalidRequestError("num_videos_per_prompt", f"{len(prompts)} prompt(s) x {n} = {len(prompts) * n} "
                                  "videos", f"at most {MAX_VIDEOS_PER_CALL} videos in one call")
    if n > 1 and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise InvalidRequestError("seed", f"got {type(seed).__name__}", "an integer (video j of a prompt takes seed + j)")
    count = len(prompts) * n
    return [VideoRequest(text, seed + j if n > 1 else seed, _numbered_path(output_path, i * n + j, count))
            for i, text in enumerate(prompts) for j in range(n)]


def _numbered_path(path: Any, k: int, count: int) -> Any:
    """``path`` for video ``k`` of ``count``: itself for one video, else ``-k`` after its name."""
    if count == 1 or not isinstance(path, (str, Path)):
        return path  # one video keeps its name; a bad value is left for the request check to name
    path = Path(path)
    if path.is_dir():
        return str(path.with_name(f"{path.name}-{k}"))
    return str(path.with_name(f"{path.stem}-{k}{path.suffix}"))


def _with_lora_files(config: EngineConfig, folder: str | Path) -> EngineConfig:
    """``config`` with each LoRA given by name (one of the folder's adapters, ``lora/<name>.safetensors``)
    replaced by its file; ValueError naming the option for one that is neither a file nor a name."""
    from .lora import LoraError, resolve_lora

    resolved = {}
    for option in ("loras", "loras_2"):
        try:
            resolved[option] = tuple((resolve_lora(file, folder), scale) for file, scale in getattr(config, option))
        except LoraError as exc:
            raise ValueError(f"{option}: {exc}") from None
    return dataclasses.replace(config, **resolved)


class VideoGenerator:
    """Python API: ``from_pretrained`` then ``generate`` or ``submit``/``step``."""

    def __init__(self, pipeline: ComposedPipeline, config: EngineConfig, model_path: Path | None = None,
                 parallel=None):
        self.pipeline = pipeline
        self.config = config
        self.model_path = model_path
        self.parallel = parallel  # parallel.ParallelState when several processes share the work
        self._ids = itertools.count(1)
        self.budget = None  # memory.budget.Budget the requests are held to (from_pretrained sets it)
        # what attention runs with in this engine's units: the kernel and the default sliding-tile window
        self.attention = AttentionContext()
        # unmerged LoRA adapters in memory by name (load_lora), least recently used first: their reports
        self.adapters: collections.OrderedDict[str, object] = collections.OrderedDict()
        # every adapter requests may name: (file, expert, keys ignored), loaded at first use when
        # not in memory (register_lora); with max_loras, the least recently used one not in use
        # by an unfinished task is dropped to make room
        self.registered: dict[str, tuple[str, str, tuple]] = {}
        self._live: weakref.WeakSet = weakref.WeakSet()  # the tasks submitted (those unfinished hold adapters)
        self.default_lora = None  # the adapters of requests that name none (lora_mode="unmerged")
        # the request settings the adapters were trained for (a distilled adapter's steps and
        # guidance), applied to the requests that use them and do not set them: the merged ones'
        # to every request, an unmerged one's to the requests naming it
        self.request_defaults: dict = {}
        self.adapter_sampling: dict[str, dict] = {}
        self.adapter_loads: collections.Counter = collections.Counter()  # how many times each was loaded

    @property
    def is_main_process(self) -> bool:
        """True in a single process, and on rank 0 of a parallel run (the one that writes files)."""
        return self.parallel is None or self.parallel.is_main

    @classmethod
    def from_pretrained(cls, path: str | Path, config: EngineConfig | None = None, size_hint: dict | None = None,
                        **engine_options) -> "VideoGenerator":
        """Load a Diffusers-format folder. ``size_hint``: the size of the requests to expect
        (``height``, ``width``, ``num_frames``; default: the folder's default size), for which the
        memory level is chosen when it is left to the engine or a ``max_memory`` budget; with a
        budget no level fits it in, an error before any weight is read."""
        if config is None:
            config = EngineConfig.from_options(**engine_options)
        elif engine_options:
            raise ValueError("pass either config= or engine options, not both")
        plan = plan_folder(path, config)
        from .default_model import sampling_defaults

        # the memory level, from the budget (max_memory, or the memory available) before loading
        config, budget = engine_level(plan, config, {**sampling_defaults(path), **(size_hint or {})},
                                      processes=world_size_from_env(), strict=size_hint is not None)
        if config.loras_2 and "transformer_2" not in plan.plans:
            raise ValueError("loras_2: this folder has one transformer (no transformer_2): give its LoRA as loras")
        config = _with_lora_files(config, path)
        if config.compile and config.low_mem_level >= 2:
            raise ValueError(f"compile: runs at low_mem_level 0 or 1, but this folder needs level {config.low_mem_level} "
                             "to fit the memory available (give max_memory, or low_mem_level=1 to force it)")
        # the attention kernel, checked before loading (flash on a CPU is an error here)
        backend = engine_backend(config.attention_backend, config.torch_device, config.resolved_dtypes()["transformer"])
        attention = AttentionContext(backend=backend, window=parse_window(config.sta_window))
        parallel = None
        if config.sp_size > 1 or config.cfg_parallel or config.tp_size > 1 or world_size_from_env() > 1:
            from .parallel.state import ParallelState, local_device

            # a wrong layout is an error before any weight is read
            for heads in plan.transformer_heads():
                check_layout(config.sp_size, config.cfg_parallel, world_size_from_env(), heads, config.ring_size,
                             config.tp_size)
            text_heads = plan.text_encoder_heads()
            if config.tp_size > 1 and text_heads is not None and text_heads % config.tp_size:
                raise ValueError(f"tp_size={config.tp_size} must divide the text encoder's {text_heads} attention heads")
            config = dataclasses.replace(config, device=str(local_device(config.torch_device)))
            parallel = ParallelState.initialize(config.sp_size, config.cfg_parallel, config.torch_device,
                                                ring_size=config.ring_size, tp_size=config.tp_size)
        residency = residency_for(config)  # where each component lives while the stages use it
        load_components(plan.plans, config, residency, parallel=parallel)
        if plan.refine is not None:
            load_components(plan.refine.plans, config, residency, "refine.", parallel=parallel)
        pipeline = plan.pipeline(residency, config, plan.limits, plan.variant, parallel,
                                 refine=plan.refine.variant if plan.refine else None, calibration=plan.calibration)
        generator = cls(pipeline, config, Path(path), parallel)
        generator.budget = budget
        generator.attention = attention
        if config.lora_mode == "merged":
            from .lora import adapter_sampling

            for file, _ in config.loras + config.loras_2:
                generator.request_defaults.update(adapter_sampling(file))
        if config.lora_mode == "unmerged":  # the engine's adapters, for every request naming none
            names = []
            for expert, loras in (("transformer", config.loras), ("transformer_2", config.loras_2)):
                for k, (file, scale) in enumerate(loras):
                    name = f"{Path(file).stem}{'@2' if expert == 'transformer_2' else ''}"
                    name = name if name not in generator.adapters else f"{name}#{k}"
                    generator.load_lora(file, name=name, expert=expert, ignore=config.lora_ignore)
                    names.append((name, scale))
            generator.default_lora = tuple(names) or None
        if config.compile:  # the first request does not pay the compilation
            generator.warm_up({**sampling_defaults(path), **(size_hint or {})})
        return generator

    def load_lora(self, path: str | Path, name: str | None = None, expert: str = "transformer",
                  ignore: tuple[str, ...] = ()):
        """Load a LoRA file unmerged as adapter ``name`` (default: the file's stem) of ``expert``
        ("transformer", or "transformer_2" of a two-expert model): requests use it with
        ``lora=[(name, scale)]``, each its own adapters, in one batched forward. Needs the
        transformer resident (memory level 0 or 1). ``path`` may name one of the model folder's
        adapters. Returns its ``lora.LoraReport``."""
        name = self.register_lora(path, name, expert, ignore, check=False)
        return self._resident(name)

    def register_lora(self, path: str | Path, name: str | None = None, expert: str = "transformer",
                      ignore: tuple[str, ...] = (), check: bool = True) -> str:
        """Make adapter ``name`` available to requests without keeping it in memory: it is loaded
        at the first request naming it and, when ``max_loras`` adapters are in memory, the least
        recently used one that no unfinished task uses is dropped first. The file is read and
        checked against the model now (``check``), so a bad one fails here. Returns the name."""
        from .lora import adapter_sampling, read_lora, resolve_lora

        path = resolve_lora(path, self.model_path)  # a file, or the name of one of the folder's adapters
        name = name or Path(path).stem
        if name in self.registered and self.registered[name][:2] != (path, expert):
            raise ValueError(f"load_lora: an adapter named {name!r} is registered already ({self.registered[name][0]}): "
                             "give this one another name")
        if (self.config.low_mem_level or 0) >= 2:
            raise ValueError(f"load_lora: unmerged adapters need the transformer resident (low_mem_level 0 or 1, "
                             f"this engine runs at {self.config.low_mem_level}); merge it at load with loras=")
        if expert not in ("transformer", "transformer_2") or expert not in self.pipeline.components:
            raise ValueError(f"load_lora: expert {expert!r} is not a transformer of this model "
                             f"(allowed: {', '.join(e for e in ('transformer', 'transformer_2') if e in self.pipeline.components)})")
        if check:
            read_lora(path, self.pipeline.components[expert], tuple(ignore))  # every key checked; the deltas dropped
        self.registered[name] = (path, expert, tuple(ignore))
        self.adapter_sampling[name] = adapter_sampling(path)
        return name

    @property
    def adapter_names(self) -> list[str]:
        """Every adapter requests may name (in memory or registered)."""
        return sorted(set(self.registered) | set(self.adapters))

    def _resident(self, name: str, pinned: set = frozenset()):
        """Adapter ``name`` in memory (loaded now if it is not), as the most recently used; the
        ``pinned`` ones are not dropped to make room."""
        from .lora import attach_adapter, read_lora

        if name in self.adapters:
            self.adapters.move_to_end(name)
            return self.adapters[name]
        limit = self.config.max_loras
        while limit is not None and len(self.adapters) >= limit:
            in_use = {n for task in list(self._live) if not task.is_finished for n, _ in (task.params.lora or ())}
            in_use |= {n for n, _ in (self.default_lora or ())} | set(pinned)
            victim = next((n for n in self.adapters if n not in in_use), None)
            if victim is None:
                raise AdaptersBusy(f"lora: the {limit} adapters in memory (max_loras={limit}) are all used by "
                                   f"unfinished requests; {name!r} cannot be loaded until one finishes")
            self._drop_adapter(victim)
        path, expert, ignore = self.registered[name]
        model = self.pipeline.components[expert]
        deltas, report = read_lora(path, model, ignore)
        attach_adapter(model, name, deltas, path)
        self.adapters[name] = report
        self.adapter_loads[name] += 1
        log.info("LoRA %s loaded unmerged as %r (%s, %d tensors)", path, name, report.format, len(report.changed))
        return report

    def _drop_adapter(self, name: str) -> None:
        from .lora import detach_adapter

        detach_adapter(self.pipeline.components[self.registered[name][1]], name)
        del self.adapters[name]
        log.info("LoRA adapter %r dropped from memory (max_loras=%s)", name, self.config.max_loras)

    def warm_up(self, size: dict | None = None) -> float:
        """Run one guided denoising step of a request of ``size`` (height, width, num_frames; default:
        the engine's default request) and drop it: compiled blocks are compiled by it, caches filled.
        Returns its seconds."""
        start = time.perf_counter()
        size = {k: v for k, v in (size or {}).items() if k in ("height", "width", "num_frames")}
        task = self.submit("", num_inference_steps=1, **size)
        while not task.is_finished and task.batch.step_index < 1:
            self.step(task)
        task.cancel()
        seconds = time.perf_counter() - start
        log.info("warm-up (%s): %.1f s", ", ".join(f"{k}={v}" for k, v in size.items()) or "default size", seconds)
        return seconds

    @staticmethod
    def request_limits(path: str | Path, config: EngineConfig | None = None) -> RequestLimits:
        """What a model folder's requests may ask (sizes, frames, steps, text length), from its
        configs and weight headers alone: checks the whole folder, reads no weights."""
        return plan_folder(path, config or EngineConfig()).limits

    def check(self, prompt: str = "", **sampling) -> CheckedRequest:
        """A request checked against this model once, before any work: the fields (sizes, frames,
        steps, guidance, ...; no file is opened), then each given image decoded once with its
        bounded checks (file size, format, dimensions). InvalidRequestError names the first bad
        field. ``submit`` takes the result as it is."""
        [checked] = self._check_all([SamplingParams.from_kwargs(prompt, **self.with_adapter_defaults(sampling))])
        return checked

    def with_adapter_defaults(self, sampling: dict) -> dict:
        """``sampling`` over the settings its adapters were trained for (``request_defaults``, and
        those of the unmerged adapters it names, or of the engine's default ones): what it gives wins."""
        names = sampling.get("lora")
        if names is None:
            names = self.default_lora or ()
        defaults = dict(self.request_defaults)
        if isinstance(names, (list, tuple)):
            for item in names:
                name = (item if isinstance(item, str) else item.get("name") if isinstance(item, dict)
                        else item[0] if isinstance(item, (list, tuple)) and item else None)
                if isinstance(name, str):
                    defaults.update(self.adapter_sampling.get(name, {}))
        return {**defaults, **sampling}

    def _check_all(self, requests: list[SamplingParams]) -> list[CheckedRequest]:
        """Every request's fields first, then the images: each image given decoded once, however
        many of the requests give it."""
        for params in requests:
            if params.lora is None and self.default_lora is not None:
                params.lora = self.default_lora
            self.pipeline.validate_request(params)
            self._memory_level(params)  # a request no memory level fits is refused here
            named = {name for name, _ in params.lora or ()}
            if self.config.max_loras is not None and len(named) > self.config.max_loras:
                raise InvalidRequestError("lora", f"{len(named)} adapters, more than this engine holds in memory",
                                          f"at most max_loras={self.config.max_loras}")
            for name, _ in params.lora or ():
                if name not in self.adapters and name not in self.registered:
                    raise InvalidRequestError("lora", f"no adapter named {name!r} is loaded",
                                              ", ".join(self.adapter_names) or "none loaded (load_lora)")
            if self.config.ring_size > 1 and params.sta_window not in (None, "dense"):
                raise InvalidRequestError("sta_window", "sliding-tile attention does not combine with this engine's "
                                          f"ring attention (ring_size={self.config.ring_size})", "None or 'dense'")
        return checked_requests(requests, self.pipeline.limits)

    def _memory_level(self, params: SamplingParams) -> int:
        """The memory level a request starts at (``memory.budget``)."""
        return request_level(self.config, self.budget, params)

    # --- task API -------------------------------------------------------------------------------
    def submit(self, prompt: str | CheckedRequest = "", callback: StepCallback | None = None, **sampling) -> Task:
        """Queue a request as a task: a ``CheckedRequest`` from ``check`` as it is, or a prompt and
        options, checked here once (InvalidRequestError before any work)."""
        if isinstance(prompt, CheckedRequest):
            if sampling:
                raise TypeError(f"submit: a checked request takes no options (got {sorted(sampling)}): "
                                "give them to check")
            if prompt.limits != self.pipeline.limits:
                raise ValueError("submit: the request was checked against another model: check it with this generator")
            checked = prompt
        else:
            checked = self.check(prompt, **sampling)
        self.check_weight_files()
        names = {name for name, _ in checked.params.lora or ()}
        for name in names:  # its adapters in memory (a registered one loaded now)
            self._resident(name, pinned=names)
        batch = ForwardBatch.for_request(checked.params, checked.images)
        task = Task(id=f"task-{next(self._ids)}", params=checked.params, batch=batch,
                    total_units=self.pipeline.total_units(batch), callback=callback,
                    memory_level=self._memory_level(checked.params))
        self._live.add(task)
        return task

    def step(self, task: Task) -> Task:
        """Do exactly one unit of work of ``task`` (text encoding, one denoising step, decoding, export)."""
        if task.is_finished:
            return task
        if task._cancel_requested:
            task.state, task.error = TaskState.CANCELLED, TaskCancelled(f"{task.id} was cancelled")
            return task
        unit = self.pipeline.unit_at(task.batch, task.cursor)
        try:
            if unit is None:
                with stage_range("export"):
                    task.result = self._finish(task)
                task.state = TaskState.DONE
                task.units_done += 1
            else:
                self._run([(task, unit)])
        except BaseException as exc:
            task.state, task.error = TaskState.FAILED, engine_error(exc)
            if task.error is exc:
                raise
            raise task.error from exc
        if task.state == TaskState.FAILED:
            raise task.error
        return task

    def step_many(self, tasks: list[Task]) -> list[int]:
        """One unit of work of each task. Tasks whose next unit is a step of the same denoising
        stage with compatible inputs (``DenoisingStage.batch_key``: same expert, latent shape and
        dtype; prompts, seeds, guidance and step counts may differ) run it as one transformer
        forward; each gets the video it gets alone (up to summation order). A task that fails
        fails alone (its error is on the task; nothing is raised). Returns the sizes of the shared
        forwards run."""
        groups: dict = {}
        for task in tasks:
            unit = self._next_unit(task)
            key = None
            if unit is not None and unit.stage.iterative and unit.index > 0:
                stage_key = unit.stage.batch_key(task.batch, unit.index)
                key = None if stage_key is None else (id(unit.stage), stage_key)
            if key is None:
                self.step_quietly(task)
            else:
                groups.setdefault(key, []).append((task, unit))
        shared = []
        for group in groups.values():
            if len(group) == 1:
                self.step_quietly(group[0][0])
            else:
                self._run(group)
                shared.append(len(group))
        return shared

    def _next_unit(self, task: Task) -> WorkUnit | None:
        if task.is_finished or task._cancel_requested:
            return None
        return self.pipeline.unit_at(task.batch, task.cursor)

    def step_quietly(self, task: Task) -> None:
        """``step``, its failure left on the task (state FAILED, error) instead of raised."""
        try:
            self.step(task)
        except Exception:  # noqa: BLE001 - recorded on the task (state FAILED, error)
            pass

    def _run(self, pairs: list[tuple[Task, WorkUnit]]) -> None:
        """One unit of each task (units of one stage) by the pipeline's runner. A task whose unit
        succeeds takes the new batch, moves its cursor past the unit and hears its callback; one
        whose unit fails is FAILED with the error, its batch as it was before the unit."""
        for task, unit in pairs:
            task.state = _PHASE_STATES[unit.stage.phase]
        with attention_context(self.attention):
            with unit_level(max(task.memory_level for task, _ in pairs)), stage_range(pairs[0][1].stage.name):
                results = run_units([unit for _, unit in pairs], [task.batch for task, _ in pairs])
            for k, ((task, unit), result) in enumerate(zip(pairs, results)):
                if is_out_of_memory(result):  # run again alone, at the next memory levels
                    results[k], task.memory_level = run_again_higher(unit, task.batch, task.memory_level, result,
                                                                     self.config.torch_device)
        for (task, unit), result in zip(pairs, results):
            if isinstance(result, Exception):  # out of memory as ResourceExhausted: callers tell errors by type
                task.state, task.error = TaskState.FAILED, engine_error(result)
                continue
            try:
                task.batch, task.cursor = result, unit.next_cursor
                if unit.stage.phase == Phase.DENOISING and unit.stage.iterative and task.callback is not None:
                    task.callback(result.step_index, result.num_steps, float(result.timestep(unit.index)),
                                  result.latents)
                task.units_done += 1
            except Exception as exc:  # noqa: BLE001 - this task's failure, not the others'
                task.state, task.error = TaskState.FAILED, exc

    def run(self, task: Task) -> VideoOutput:
        while not task.is_finished:
            self.step(task)
        if task.state == TaskState.CANCELLED:
            raise task.error
        return task.result

    def submit_many(self, prompt: str | list[str] = "", num_videos_per_prompt: int = 1,
                    callback: StepCallback | None = None, **sampling) -> list[Task]:
        """A task for each video of ``video_requests`` (each prompt's ``num_videos_per_prompt``
        videos, seeds ``seed, seed + 1, ...``); every request is checked once before any is queued,
        an image the videos share decoded once for all of them."""
        sampling = self.with_adapter_defaults(sampling)
        requests = video_requests(prompt, num_videos_per_prompt, sampling.pop("seed", SamplingParams.seed),
                                  sampling.pop("output_path", None))
        checked = self._check_all([SamplingParams.from_kwargs(r.prompt, seed=r.seed, output_path=r.output_path,
                                                              **sampling) for r in requests])
        return [self.submit(request, callback) for request in checked]

    def run_many(self, tasks: list[Task], on_round: Callable[[list[Task]], None] | None = None
                 ) -> list[VideoOutput]:
        """Run ``tasks`` to the end together: each round one unit of each, compatible denoising
        steps as one transformer forward (``step_many``), then ``on_round(tasks)`` (a progress
        bar, say). The first task that fails or is cancelled stops the others and its error is
        raised."""
        while True:
            stopped = next((t for t in tasks if t.state in (TaskState.FAILED, TaskState.CANCELLED)), None)
            pending = [t for t in tasks if not t.is_finished]
            if stopped is not None:
                for task in pending:
                    task.cancel()
                raise stopped.error
            if not pending:
                return [task.result for task in tasks]
            self.step_many(pending)
            if on_round is not None:
                on_round(tasks)

    def generate(self, prompt: str | list[str] = "", callback: StepCallback | None = None, *,
                 num_videos_per_prompt: int = 1, **sampling) -> VideoOutput | list[VideoOutput]:
        """Generate videos; see ``SamplingParams`` for the options.

        A str prompt with ``num_videos_per_prompt=1`` gives one VideoOutput. A list of prompts,
        or ``num_videos_per_prompt=N > 1``, gives a list: each prompt's N videos in turn, with
        seeds ``seed, seed + 1, ..., seed + N - 1`` (the same seeds for every prompt), at most
        ``MAX_VIDEOS_PER_CALL`` in all, run together as one step-batched group (``run_many``);
        each video equals its own ``generate`` call up to summation order. With several videos
        and ``output_path``, video k (from 0) is written to ``name-k.ext`` (``clip.mp4`` gives
        ``clip-0.mp4``, ``clip-1.mp4``, ...). Every request is checked before any work; the
        callback hears every video's steps."""
        many = isinstance(prompt, (list, tuple)) or not (type(num_videos_per_prompt) is int
                                                         and num_videos_per_prompt == 1)
        if not many:
            return self.run(self.submit(prompt, callback=callback, **sampling))
        return self.run_many(self.submit_many(prompt, num_videos_per_prompt, callback=callback, **sampling))

    def check_weight_files(self) -> None:
        """ModelLoadError when a weight file whose pages parameters map changed on disk since
        loading: reading a truncated mapped file kills the process (SIGBUS), and a file rewritten
        in place changes the weights under the model. One stat per file; run before each request.
        Engines built with ``map_weights=False`` hold their own copies and never fail here."""
        for name, component in self.pipeline.components.items():
            changed = changed_mapped_files(component) if isinstance(component, torch.nn.Module) else []
            if changed:
                raise ModelLoadError(f"the {name} weights changed on disk since they were loaded (they are mapped): "
                                     "load the model again, or use map_weights=False", file=str(changed[0]))

    # --- output ----------------------------------------------------------------------------------
    def _finish(self, task: Task) -> VideoOutput:
        b, p = task.batch, task.params
        frames = None
        if b.video is not None:
            frames_pt = b.video[0].permute(1, 2, 3, 0).contiguous()  # (T, H, W, 3)
            frames = frames_pt if p.output_type == "pt" else frames_pt.cpu().numpy()
        out = VideoOutput(
            frames=frames, latents=b.latents, params=p, trajectory_latents=list(b.trajectory),
            trajectory_frames=[v[0].permute(1, 2, 3, 0).cpu().numpy() for v in b.trajectory_video],
        )
        if (p.output_path is not None or p.output_type == "mp4") and frames is not None and self.is_main_process:
            from .io import save_video

            start = time.perf_counter()
            out.path = save_video(frames_pt.cpu().numpy(), p.output_path, fps=p.fps, folder=DEFAULT_OUTPUT_DIR,
                                  stem=task.id)
            b.timings["export"] = time.perf_counter() - start
        out.timings = dict(b.timings)
        out.cache = dict(b.policy_report)
        return out


__all__ = ["CheckedRequest", "VideoGenerator", "VideoOutput", "Task", "TaskState", "VidloomError"]

