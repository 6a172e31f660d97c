"""Residency: one policy object decides where each component lives while a stage uses it.

Stages hold ``Handle``s, never the modules: ``with handle.use() as module:`` gives the module,
ready on its compute device, for one block of work (a text encoding, one denoising step, a
decode), and tells the policy when that work is done. What a stage needs to know before using a
component (its config, its compute dtype) is on the handle, so a policy may move a component
between uses, or (a later policy) release and reload it.

``Residency`` itself is the simplest policy: every component stays where the loader put it, on
the engine's device. A policy subclasses it and overrides ``load_device`` (where the loader puts
a component), ``acquire`` (before a use) and ``release`` (after it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ..loader.compute import ATTRIBUTE as COMPUTE_DTYPE


class _Described:
    """What a handle tells about its component without using it: its name, config and compute dtype."""

    def __init__(self, name: str, module: torch.nn.Module):
        self.name = name
        self.config = getattr(module, "config", None)
        self._dtype: torch.dtype | None = getattr(module, COMPUTE_DTYPE, None)
        self._kind = type(module).__name__

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

    def __init__(self, residency: "Residency", name: str, module: torch.nn.Module):
        super().__init__(name, module)
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
        self._components: dict[str, Any] = {}
        self._handles: dict[str, Handle] = {}

    # --- the policy's decisions (subclasses override) --------------------------------------------
    def load_device(self, name: str) -> torch.device:
        """Where the loader puts component ``name``."""
        return self.device

    def acquire(self, name: str) -> torch.nn.Module:
        """Component ``name``, made ready on its compute device for a use."""
        return self._components[name]

    def release(self, name: str) -> None:
        """A use of component ``name`` is over."""

    # --- the mechanics ---------------------------------------------------------------------------
    def add(self, components: dict[str, Any], prefix: str = "") -> None:
        """Take the loaded ``components``, their names prefixed with ``prefix`` (a refine
        folder's "refine."); each module gets a handle."""
        for name, component in components.items():
            self._components[prefix + name] = component
            if isinstance(component, torch.nn.Module):
                self._handles[prefix + name] = Handle(self, prefix + name, component)

    def handle(self, name: str) -> Handle:
        return self._handles[name]

    def parts(self, prefix: str = "") -> dict[str, Any]:
        """The components named ``prefix...`` (prefix removed) as stages take them: modules as
        their handles, tokenizers, schedulers and configs as they are."""
        return {name[len(prefix):]: self._handles.get(name, component)
                for name, component in self._components.items() if name.startswith(prefix)
                and (prefix or "." not in name)}

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[torch.nn.Module]:
        module = self.acquire(name)
        try:
            yield module
        finally:
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
        super().__init__(name, module)
        self._module = module

    @contextlib.contextmanager
    def use(self) -> Iterator[torch.nn.Module]:
        yield self._module


def handle_of(component, name: str = "transformer") -> Handle | Fixed:
    """``component`` as a handle: itself if it is one, else a ``Fixed`` handle (named ``name``)
    to the module."""
    return component if isinstance(component, (Handle, Fixed)) else Fixed(component, name)


def residency_for(config) -> Residency:
    """The policy an ``EngineConfig`` asks for: ``offload_experts`` keeps the idle expert of a
    two-expert model in CPU memory; otherwise every component stays resident."""
    if config.offload_experts:
        from .expert_offload import ExpertOffload

        return ExpertOffload(config.torch_device)
    return Residency(config.torch_device)
