"""Residency: one policy object decides where each component lives while a stage uses it.

Stages hold ``Handle``s, never the modules: ``with handle.use() as module:`` gives the module,
ready on its compute device, for one block of work (a text encoding, one denoising step, a
decode), and tells the policy when that work is done. What a stage needs to know before using a
component (its config, its compute dtype) is on the handle, so a policy may move a component
between uses, or (a later policy) release and reload it.

``Residency`` itself is the simplest policy: every component stays where the loader put it, on
the engine's device. A policy subclasses it and overrides ``load_device`` (where the loader puts
a component), ``loads_at_start`` (whether a planned component is loaded with the engine or at its
first use), ``acquire`` (before a use) and ``release`` (after it). A component added as a plan
(``add_planned``) can be dropped (``drop``) and is loaded again from its files at its next use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import types
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..loader.compute import ATTRIBUTE as COMPUTE_DTYPE

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Planned:
    """A component the policy loads itself, when it decides: what a handle tells about it before
    it is loaded (``config``, compute ``dtype``, ``kind``: its class name) and ``load(device)``."""

    config: Any
    dtype: torch.dtype
    kind: str
    load: Callable[[torch.device], Any]

    def __post_init__(self):
        if isinstance(self.config, dict):  # a transformers config.json: read by attribute, as the module's
            object.__setattr__(self, "config", types.SimpleNamespace(**self.config))


def _facts(module: torch.nn.Module) -> tuple[Any, torch.dtype | None, str]:
    return getattr(module, "config", None), getattr(module, COMPUTE_DTYPE, None), type(module).__name__


class _Described:
    """What a handle tells about its component without using it: its name, config and compute dtype."""

    def __init__(self, name: str, config: Any, dtype: torch.dtype | None, kind: str):
        self.name = name
        self.config = config
        self._dtype = dtype
        self._kind = kind

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the component computes in, as the loader declared it (``loader.compute``)."""
        if self._dtype is None:
            raise ValueError(f"{self._kind} has no recorded compute dtype: load it through vidloom.loader "
                             "(or declare one with loader.compute.record_compute_dtype)")
        return self._dtype


class Handle(_Described):
    """A stage's reference to component ``name`` under ``residency``: its config and compute
    dtype (read once, when the component was added), and ``use()``."""

    def __init__(self, residency: "Residency", name: str, config: Any, dtype: torch.dtype | None, kind: str):
        super().__init__(name, config, dtype, kind)
        self.residency = residency

    def use(self) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """The module, where it computes, for one block of work."""
        return self.residency.use(self.name)

    def __repr__(self) -> str:
        return f"Handle({self.name!r}, {type(self.residency).__name__})"


class Residency:
    """Every component resident on ``device`` (or where the loader put it), for as long as the
    engine lives: nothing moves between uses."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._components: dict[str, Any] = {}  # what is in memory now
        self._handles: dict[str, Handle] = {}
        self._planned: dict[str, Planned] = {}  # what can be loaded (again)
        self._in_use: Counter = Counter()
        self.loads: Counter = Counter()  # how many times each planned component was loaded

    # --- the policy's decisions (subclasses override) --------------------------------------------
    def load_device(self, name: str) -> torch.device:
        """Where the loader puts component ``name``."""
        return self.device

    def loads_at_start(self, name: str) -> bool:
        """Whether planned component ``name`` is loaded with the engine (else at its first use)."""
        return True

    def acquire(self, name: str) -> torch.nn.Module:
        """Component ``name``, made ready on its compute device for a use."""
        return self.loaded(name)

    def release(self, name: str) -> None:
        """A use of component ``name`` is over."""

    # --- the mechanics ---------------------------------------------------------------------------
    def add(self, components: dict[str, Any], prefix: str = "") -> None:
        """Take the loaded ``components``, their names prefixed with ``prefix`` (a refine
        folder's "refine."); each module gets a handle."""
        for name, component in components.items():
            self._components[prefix + name] = component
            if isinstance(component, torch.nn.Module):
                self._handles[prefix + name] = Handle(self, prefix + name, *_facts(component))

    def add_planned(self, planned: dict[str, Planned], prefix: str = "") -> None:
        """Take components as plans: each gets a handle now and is loaded now or at its first use,
        as ``loads_at_start`` says."""
        for name, plan in planned.items():
            full = prefix + name
            self._planned[full] = plan
            self._handles[full] = Handle(self, full, plan.config, plan.dtype, plan.kind)
            if self.loads_at_start(full):
                self.loaded(full)

    def loaded(self, name: str) -> Any:
        """Component ``name``, loaded from its plan if it is not in memory."""
        if name not in self._components:
            start = time.perf_counter()
            self._components[name] = self._planned[name].load(self.load_device(name))
            self.loads[name] += 1
            log.info("loaded %s in %.1f s", name, time.perf_counter() - start)
        return self._components[name]

    def drop(self, name: str) -> bool:
        """Forget planned component ``name``'s module (not while it is in use), so its memory can
        return; it is loaded again at its next use. Returns whether it was dropped."""
        if name not in self._planned or name not in self._components or self._in_use[name]:
            return False
        del self._components[name]
        log.info("released %s", name)
        return True

    def in_memory(self) -> list[str]:
        """The planned components loaded now."""
        return [name for name in self._planned if name in self._components]

    def handle(self, name: str) -> Handle:
        return self._handles[name]

    def parts(self, prefix: str = "") -> dict[str, Any]:
        """The components named ``prefix...`` (prefix removed) as stages take them: modules as
        their handles, tokenizers, schedulers and configs as they are."""
        names = list(self._components) + [name for name in self._planned if name not in self._components]
        return {name[len(prefix):]: self._handles.get(name, self._components.get(name))
                for name in names if name.startswith(prefix) and (prefix or "." not in name)}

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[torch.nn.Module]:
        module = self.acquire(name)
        self._in_use[name] += 1
        try:
            yield module
        finally:
            self._in_use[name] -= 1
            self.release(name)

    def components(self) -> dict[str, Any]:
        """Every component the policy holds, by name (modules as they are now)."""
        return dict(self._components)

    @staticmethod
    def device_of(module: torch.nn.Module) -> torch.device:
        return next(module.parameters()).device


class Fixed(_Described):
    """A handle to a module that no policy manages (a stage built by hand, in a test or a
    benchmark): ``use()`` gives the module as it is."""

    def __init__(self, module: torch.nn.Module, name: str):
        super().__init__(name, *_facts(module))
        self._module = module

    @contextlib.contextmanager
    def use(self) -> Iterator[torch.nn.Module]:
        yield self._module


def handle_of(component, name: str = "transformer") -> Handle | Fixed:
    """``component`` as a handle: itself if it is one, else a ``Fixed`` handle (named ``name``)
    to the module."""
    return component if isinstance(component, (Handle, Fixed)) else Fixed(component, name)


def residency_for(config) -> Residency:
    """The policy an ``EngineConfig`` asks for: its memory level's (``memory.levels``); below
    level 2, ``offload_experts`` keeps the idle expert of a two-expert model in CPU memory."""
    from .levels import ONE_COMPONENT, LevelResidency

    level = config.low_mem_level or 0
    if config.offload_experts and level < ONE_COMPONENT:
        from .expert_offload import ExpertOffload

        return ExpertOffload(config.torch_device, level)
    return LevelResidency(config.torch_device, level)
