"""What every loadable model shares: an architecture config read from ``config.json``
and the declarative facts the loader needs (key mapping, fp32-kept parameters)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Self

from torch import nn

from ..errors import ModelLoadError
from ..jsonfile import read_json_object, short_repr


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """Base for architecture configs. Subclasses are frozen dataclasses whose field
    names are the keys of the Diffusers ``config.json``."""

    # config.json keys that carry no architecture (bookkeeping of the writer)
    ignored_keys: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Self:
        """The config of ``raw`` (a parsed config.json): every key known, every value of its field's
        type (no coercion: ``"2"`` is not an int, ``"no"`` not a bool), then ``validate``."""
        if not isinstance(raw, dict):
            raise ValueError(f"{cls.__name__}: a config must be a JSON object, got {type(raw).__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in raw.items():
            if key.startswith("_") or key in cls.ignored_keys:
                continue
            if key not in names:
                raise ValueError(
                    f"{cls.__name__}: unknown config key '{key}' (known: {', '.join(sorted(names))})"
                )
            if not _has_type(value, hints[key]):
                raise ValueError(f"{key}: expected {_type_name(hints[key])}, got {short_repr(value)}")
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        config = cls(**kwargs)
        config.validate()
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> Self:
        """The config in ``path``; any problem is a ModelLoadError naming the file and the field."""
        raw = read_json_object(path, "config.json")
        try:
            return cls.from_dict(raw)
        except (ValueError, TypeError, OverflowError) as exc:
            raise ModelLoadError(f"invalid config ({exc})", file=str(path)) from exc

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def validate(self) -> None:
        """Raise ValueError naming the field when a value cannot work."""


def _has_type(value: Any, tp: Any) -> bool:
    """Whether a JSON value fits a config field annotation (int, float, bool, str, None, unions,
    tuple[X, ...] and fixed-length tuples, read from JSON lists). Numbers must be finite."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or isinstance(tp, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_has_type(v, args[0]) for v in value)
        return len(value) == len(args) and all(_has_type(v, a) for v, a in zip(value, args))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    return True  # Any


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or isinstance(tp, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} {_type_name(args[0])}"
    names = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
             type(None): "null"}
    return names.get(tp, str(tp))


def require_range(config: Any, name: str, low: int, high: int) -> None:
    """ValueError naming ``name`` unless ``low <= config.name <= high``: the sane-size backstop of
    architecture configs, so an absurd value fails at once instead of building for minutes."""
    value = getattr(config, name)
    if not low <= value <= high:
        raise ValueError(f"{name}: must be in {low}..{high}, got {value}")


class LoadableModel(nn.Module):
    """A module the loader can build on the meta device and fill from safetensors.

    Class attributes:
      config_class      the ArchConfig subclass read from config.json
      diffusers_class   the ``_class_name`` written to config.json when saving
      checkpoint_key_map  ordered (regex, replacement) pairs from checkpoint keys to
                          parameter names; an empty table means the names are equal
      keep_fp32         parameter-name substrings kept in float32 whatever the dtype
      layer_counts      (checkpoint-key regex with one index group, config -> count) pairs:
                          the indices a checkpoint holds must be 0..count-1, checked on the
                          file's header before the model is built
    Models hold no buffers the checkpoint does not fill: derived tensors (rope
    tables and the like) are computed in forward from shapes.
    """

    config_class: ClassVar[type[ArchConfig]]
    diffusers_class: ClassVar[str]
    checkpoint_key_map: ClassVar[tuple[tuple[str, str], ...]] = ()
    keep_fp32: ClassVar[tuple[str, ...]] = ()
    layer_counts: ClassVar[tuple[tuple[str, Callable[[Any], int]], ...]] = ()
    # (module-name pattern, kind) pairs: how parallel.tensor shards it (kinds: see TensorParallel)
    tensor_parallel_plan: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, config: ArchConfig):
        super().__init__()
        self.config = config
