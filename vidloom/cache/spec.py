"""The ``cache`` request field: which feature-cache policies a request runs with, and their
settings, parsed and checked before any work.

Grammar: policies joined by ``+``, each ``name:arg[:arg]``:

- ``block:F<n>B<m>:<threshold>`` (or ``block:<threshold>``, F1B0): the first n and last m
  transformer blocks always run; the middle blocks are skipped, their residual reused, while the
  first blocks' output has changed by less than ``threshold`` (relative L1, accumulated over the
  skipped steps) since the middle blocks last ran.
- ``pab:<n>:<m>``: pyramid attention broadcast: from 10 % to 90 % of the steps each block's
  self-attention output is recomputed every n-th step and reused between, cross-attention every
  m-th.
- ``cfg-gate:<fraction>``: after that fraction of the steps the unconditional branch is not
  computed; guidance reuses its last computed difference to the conditional branch.

- ``teacache:<threshold>``: all blocks skipped while the first block's timestep-modulated input
  has changed, rescaled by the folder's calibrated polynomial and accumulated, by less than the
  threshold (``vidloom calibrate-cache`` writes the polynomial).
- ``magcache:<threshold>[:K<k>][:R<r>]``: all blocks skipped while the calibrated drift of the
  residual's magnitude, accumulated, stays under the threshold, at most k steps in a row
  (default 2), never in the first r of the steps (default 0.2).

At most one block-skipping policy; ``cfg-gate`` combines with it. A threshold of 0 reproduces the
uncached output exactly."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InvalidRequestError

MAX_SPEC_CHARS = 200
ALLOWED = ("block:F<n>B<m>:<threshold> (e.g. block:F1B0:0.08), teacache:<threshold>, "
           "magcache:<threshold>[:K<max skips>][:R<retention>], pab:<self every>:<cross every> (e.g. pab:2:4), "
           "cfg-gate:<fraction in [0, 1]> (e.g. cfg-gate:0.5), joined by '+'")
MAX_THRESHOLD = 10.0


@dataclass(frozen=True)
class BlockCache:
    """DBCache-like: ``first`` and ``last`` blocks always computed, the middle ones skipped while
    the first blocks' output changes less than ``threshold``."""

    first: int = 1
    last: int = 0
    threshold: float = 0.08

    def text(self) -> str:
        return f"block:F{self.first}B{self.last}:{self.threshold:g}"


@dataclass(frozen=True)
class TeaCache:
    threshold: float = 0.1

    def text(self) -> str:
        return f"teacache:{self.threshold:g}"


@dataclass(frozen=True)
class MagCache:
    threshold: float = 0.1
    max_skips: int = 2
    retention: float = 0.2

    def text(self) -> str:
        return f"magcache:{self.threshold:g}:K{self.max_skips}:R{self.retention:g}"


@dataclass(frozen=True)
class PAB:
    """Attention outputs broadcast in the middle of the schedule: self-attention recomputed every
    ``self_every`` steps, cross-attention every ``cross_every``."""

    self_every: int = 2
    cross_every: int = 4

    def text(self) -> str:
        return f"pab:{self.self_every}:{self.cross_every}"


@dataclass(frozen=True)
class CfgGate:
    """From step ``ceil(after x steps)`` on, the unconditional branch is skipped."""

    after: float = 0.5

    def text(self) -> str:
        return f"cfg-gate:{self.after:g}"


@dataclass(frozen=True)
class CacheSpec:
    """A request's policies: at most one skipping policy (``blocks``: a block cache, TeaCache,
    MagCache or PAB) and an optional CFG gate."""

    blocks: BlockCache | TeaCache | MagCache | PAB | None = None
    cfg_gate: CfgGate | None = None

    def text(self) -> str:
        return "+".join(p.text() for p in (self.blocks, self.cfg_gate) if p is not None)

    def check_fits(self, num_layers: int | None) -> None:
        """The block counts must leave middle blocks to skip in a transformer of ``num_layers``."""
        b = self.blocks
        if isinstance(b, BlockCache) and num_layers is not None and b.first + b.last >= num_layers:
            raise InvalidRequestError("cache", f"{b.text()} always runs {b.first + b.last} blocks, and this "
                                      f"transformer has {num_layers}", f"F + B below {num_layers}")


def _number(text: str, what: str, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InvalidRequestError("cache", f"{what} {text[:20]!r} is not a number", ALLOWED) from None
    if not low <= value <= high:  # also refuses nan
        raise InvalidRequestError("cache", f"{what} {value:g} is outside {low:g}..{high:g}", ALLOWED)
    return value


def _block(args: list[str]) -> BlockCache:
    if len(args) == 1:
        return BlockCache(threshold=_number(args[0], "block threshold", 0, MAX_THRESHOLD))
    if len(args) != 2:
        raise InvalidRequestError("cache", f"block takes F<n>B<m>:<threshold>, got {':'.join(args)[:40]!r}", ALLOWED)
    shape = re.fullmatch(r"f(\d{1,3})b(\d{1,3})", args[0])  # lower-cased with the rest
    if shape is None:
        raise InvalidRequestError("cache", f"block shape {args[0][:20]!r} is not F<n>B<m>", ALLOWED)
    first, last = int(shape[1]), int(shape[2])
    if first < 1:
        raise InvalidRequestError("cache", "block needs at least one first block (F1 or more): its output decides",
                                  ALLOWED)
    return BlockCache(first, last, _number(args[1], "block threshold", 0, MAX_THRESHOLD))


def _magcache(args: list[str]) -> MagCache:
    if not args:
        raise InvalidRequestError("cache", "magcache takes a threshold, e.g. magcache:0.1:K2:R0.2", ALLOWED)
    fields = {"threshold": _number(args[0], "magcache threshold", 0, MAX_THRESHOLD)}
    for arg in args[1:]:
        if arg[:1] == "k" and arg[1:].isdigit() and "max_skips" not in fields:
            fields["max_skips"] = min(int(arg[1:]), 1000)
        elif arg[:1] == "r" and "retention" not in fields:
            fields["retention"] = _number(arg[1:], "magcache retention", 0, 1)
        else:
            raise InvalidRequestError("cache", f"magcache option {arg[:20]!r} is not K<n> or R<fraction>", ALLOWED)
    return MagCache(**fields)


def parse_cache(value) -> CacheSpec | None:
    """``SamplingParams.cache`` -> a CacheSpec (None or "" or "none": no cache); InvalidRequestError
    naming ``cache`` for anything else."""
    if value is None or isinstance(value, CacheSpec):
        return value
    if not isinstance(value, str):
        raise InvalidRequestError("cache", f"got {type(value).__name__}", ALLOWED)
    if len(value) > MAX_SPEC_CHARS:
        raise InvalidRequestError("cache", f"{len(value)} characters", f"at most {MAX_SPEC_CHARS}")
    text = value.strip().lower()
    if text in ("", "none", "off"):
        return None
    parts: dict[str, object] = {}
    for item in text.split("+"):
        name, *args = item.strip().split(":")
        if name in ("block", "teacache", "magcache", "pab") and "blocks" in parts:
            raise InvalidRequestError("cache", f"{name}: one block-skipping policy at a time "
                                      f"({parts['blocks'].text()} is given)", ALLOWED)
        if name.replace("-", "_") in parts:
            raise InvalidRequestError("cache", f"{name} given twice", ALLOWED)
        if name == "block":
            parts["blocks"] = _block(args)
        elif name == "teacache":
            if len(args) != 1:
                raise InvalidRequestError("cache", "teacache takes one threshold, e.g. teacache:0.1", ALLOWED)
            parts["blocks"] = TeaCache(_number(args[0], "teacache threshold", 0, MAX_THRESHOLD))
        elif name == "magcache":
            parts["blocks"] = _magcache(args)
        elif name == "pab":
            if len(args) != 2:
                raise InvalidRequestError("cache", "pab takes two periods, e.g. pab:2:4", ALLOWED)
            every = [int(_number(a, "pab period", 1, 100)) for a in args]
            if any(str(e) != a for e, a in zip(every, args)):
                raise InvalidRequestError("cache", f"pab periods must be whole numbers, got {':'.join(args)}", ALLOWED)
            parts["blocks"] = PAB(*every)
        elif name == "cfg-gate":
            if len(args) != 1:
                raise InvalidRequestError("cache", "cfg-gate takes one fraction, e.g. cfg-gate:0.5", ALLOWED)
            parts["cfg_gate"] = CfgGate(_number(args[0], "cfg-gate fraction", 0, 1))
        else:
            raise InvalidRequestError("cache", f"unknown policy {name[:30]!r}", ALLOWED)
    return CacheSpec(**parts)
