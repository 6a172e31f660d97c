"""The block-skipping policies: each says which blocks it may skip (``span``) and, per request,
CFG branch and expert, whether this step skips them (``decide``), keeping what it measures in
``state`` (a dict the caller keeps in the request's ``PolicyState``).

- ``BlockPolicy`` (``block:F<n>B<m>:<t>``): the first blocks' output change, accumulated.
- ``TeaCachePolicy`` (``teacache:<t>``): the change of the first block's timestep-modulated input,
  rescaled by the folder's calibrated polynomial, accumulated.
- ``MagCachePolicy`` (``magcache:<t>[:K<k>][:R<r>]``): the calibrated ratio of successive steps'
  residual magnitudes, its drift from 1 accumulated; at most k skips in a row; the first r of the
  steps always computed.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InvalidRequestError
from .spec import PAB, BlockCache, MagCache, TeaCache


def relative_l1(now: torch.Tensor, before: torch.Tensor) -> float:
    return float((now.float() - before.float()).abs().mean() / before.float().abs().mean().clamp_min(1e-12))


class ChangeMeter:
    """Relative L1 change of per-token tensors (B, L, ...) between steps, over the whole sequence:
    under sequence parallelism each rank sums its own tokens (the padding left out) and the sums
    are all-reduced, so every rank takes the same skip decision as one process would."""

    def __init__(self, sequence=None, length: int = 0):
        self.sequence, self.length = sequence, length

    def __call__(self, now: torch.Tensor, before: torch.Tensor) -> float:
        if self.sequence is None:
            return relative_l1(now, before)
        start, stop = self.sequence.span(self.length)
        real = max(0, min(stop, self.length) - start)  # this rank's tokens that are not padding
        now, before = now[:, :real].float(), before[:, :real].float()
        sums = torch.stack([(now - before).abs().sum(), before.abs().sum()]).double()
        torch.distributed.all_reduce(sums, group=self.sequence.group)
        return float(sums[0] / sums[1].clamp_min(1e-12))


class _Accumulating:
    """A policy that skips every block while a change it measures, accumulated step over step,
    stays under ``spec.threshold``; a step that runs the blocks starts the sum again."""

    name = ""

    def __init__(self, spec):
        self.spec = spec

    def span(self, n: int) -> tuple[int, int]:
        return 0, n

    def measured(self, state: dict, key: str, now, measure, rescale=float) -> bool:
        """Add ``rescale(change of now since the step before)`` to the sum; True: skip."""
        if key in state:
            state["change"] = state.get("change", 0.0) + max(rescale(measure(now, state[key])), 0.0)
        state[key] = now
        return state.get("change", 0.0) < self.spec.threshold

    def computed(self, state: dict, residual) -> None:
        state["change"] = 0.0

    def estimate(self, state: dict) -> float:
        return state.get("change", 0.0)


class BlockPolicy(_Accumulating):
    """The first blocks' output, its relative L1 change; the middle blocks are the ones skipped."""

    name = "block"

    def span(self, n: int) -> tuple[int, int]:
        return self.spec.first, n - self.spec.last

    def decide(self, state: dict, model, tokens, h, rows: slice, owner, measure) -> bool:
        return self.measured(state, "first", h[rows], measure)


class TeaCachePolicy(_Accumulating):
    """The first block's timestep-modulated input, its relative L1 change rescaled by the expert's
    calibrated polynomial."""

    name = "teacache"

    def __init__(self, spec: TeaCache, coefficients: dict[str, list[float]]):
        super().__init__(spec)
        self.coefficients = coefficients  # expert name -> polynomial, highest power first

    def decide(self, state: dict, model, tokens, h, rows: slice, owner, measure) -> bool:
        polynomial = self.coefficients[state["expert"]]
        inp = model.blocks[0].attention_input(h[rows], tokens.modulation[rows], tokens.runs)
        return self.measured(state, "input", inp, measure, lambda change: float(np.polyval(polynomial, change)))


class MagCachePolicy:
    name = "magcache"

    def __init__(self, spec: MagCache, ratios: dict[str, list[float]]):
        self.spec = spec
        self.ratios = ratios  # "expert/branch" -> the residual magnitude ratio at each calibrated step

    def span(self, n: int) -> tuple[int, int]:
        return 0, n

    def ratio(self, curve: str, step: int, num_steps: int) -> float:
        # a branch the calibration runs had not (guidance 1 there) takes the conditional curve
        values = self.ratios.get(curve) or self.ratios[curve.rsplit("/", 1)[0] + "/cond"]
        position = step / max(num_steps - 1, 1) * (len(values) - 1)  # the calibrated curve, resampled
        return float(np.interp(position, np.arange(len(values)), values))

    def decide(self, state: dict, model, tokens, h, rows: slice, owner, measure) -> bool:
        if owner.step < self.spec.retention * owner.num_steps:
            return False
        ratio = self.ratio(state["curve"], owner.step, owner.num_steps)
        state["ratio"] = state.get("ratio", 1.0) * ratio
        state["error"] = state.get("error", 0.0) + abs(1.0 - state["ratio"])
        skip = state["error"] < self.spec.threshold and state.get("skips", 0) < self.spec.max_skips
        if skip:
            state["skips"] = state.get("skips", 0) + 1
        return skip

    def computed(self, state: dict, residual) -> None:
        state.update(ratio=1.0, error=0.0, skips=0)

    def estimate(self, state: dict) -> float:
        return state.get("error", 0.0)


def policy_for(spec, calibration):
    """The policy object for a request's block-skipping spec, with the folder's calibration."""
    if isinstance(spec, (BlockCache, PAB)):
        return BlockPolicy(spec) if isinstance(spec, BlockCache) else None
    if calibration is None:
        raise InvalidRequestError("cache", f"{spec.text()} needs this model folder calibrated",
                                  "run `vidloom calibrate-cache --model DIR` once, or use block:... / cfg-gate:...")
    if isinstance(spec, TeaCache):
        return TeaCachePolicy(spec, calibration.teacache)
    return MagCachePolicy(spec, calibration.magcache)
