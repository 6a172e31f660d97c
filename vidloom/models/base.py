"""What every loadable model shares: an architecture config read from ``config.json``
and the declarative facts the loader needs (key mapping, fp32-kept parameters)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar, Self

from torch import nn


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """Base for architecture configs. Subclasses are frozen dataclasses whose field
    names are the keys of the Diffusers ``config.json``."""

    # config.json keys that carry no architecture (bookkeeping of the writer)
    ignored_keys: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in raw.items():
            if key.startswith("_") or key in cls.ignored_keys:
                continue
            if key not in names:
                raise ValueError(
                    f"{cls.__name__}: unknown config key '{key}' (known: {', '.join(sorted(names))})"
                )
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        config = cls(**kwargs)
        config.validate()
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> Self:
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def validate(self) -> None:
        """Raise ValueError naming the field when a value cannot work."""


class LoadableModel(nn.Module):
    """A module the loader can build on the meta device and fill from safetensors.

    Class attributes:
      config_class      the ArchConfig subclass read from config.json
      diffusers_class   the ``_class_name`` written to config.json when saving
      checkpoint_key_map  ordered (regex, replacement) pairs from checkpoint keys to
                          parameter names; an empty table means the names are equal
      keep_fp32         parameter-name substrings kept in float32 whatever the dtype
    Models hold no buffers the checkpoint does not fill: derived tensors (rope
    tables and the like) are computed in forward from shapes.
    """

    config_class: ClassVar[type[ArchConfig]]
    diffusers_class: ClassVar[str]
    checkpoint_key_map: ClassVar[tuple[tuple[str, str], ...]] = ()
    keep_fp32: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ArchConfig):
        super().__init__()
        self.config = config
