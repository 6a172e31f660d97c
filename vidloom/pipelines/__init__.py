"""Pipelines, registered by the Diffusers ``_class_name`` they serve.

``pipeline_class(name)`` discovers the pipeline modules of this package on first use, so a
new family only adds a module with a ``@register_pipeline(...)`` class.
"""

from __future__ import annotations

import importlib
import pkgutil

_REGISTRY: dict[str, type] = {}
_DISCOVERED = False


def register_pipeline(*class_names: str):
    def decorate(cls):
        for name in class_names:
            _REGISTRY[name] = cls
        return cls

    return decorate


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base", "batch", "stages"):
            importlib.import_module(f"{__name__}.{info.name}")
    _DISCOVERED = True


def registered_pipelines() -> dict[str, type]:
    _discover()
    return dict(_REGISTRY)


def pipeline_class(class_name: str) -> type:
    _discover()
    if class_name not in _REGISTRY:
        raise KeyError(class_name)
    return _REGISTRY[class_name]
