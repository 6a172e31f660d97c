"""Calibration of the feature caches for any model folder: ``vidloom calibrate-cache``.

Uncached generations run with a recording model call; for every step, CFG branch and expert it
measures the change of the first block's timestep-modulated input and of the blocks' residual
(output minus input) from the previous step, and the ratio of the residual's magnitude to the
previous step's. From those: TeaCache's polynomial (input change -> residual change, degree 4,
per expert) and MagCache's ratio curve (per expert and branch, mean over the prompts). They are
written beside ``model_index.json`` as ``vidloom_cache.json`` and read with the folder."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelLoadError
from ..jsonfile import read_json_object, write_json
from ..models.attention import sequence_parallel
from .call import run_blocks
from .policies import relative_l1

CALIBRATION_FILE = "vidloom_cache.json"
FORMAT = 1
DEGREE = 4
DEFAULT_PROMPTS = ("a red circle moving right", "a blue square moving left", "a green triangle moving up",
                   "a yellow circle moving down")


@dataclasses.dataclass(frozen=True)
class Calibration:
    """``teacache``: expert -> polynomial coefficients (highest power first); ``magcache``:
    "expert/branch" -> the residual magnitude ratio at each of ``steps`` steps."""

    steps: int
    teacache: dict[str, list[float]]
    magcache: dict[str, list[float]]
    prompts: int = 0

    def covers(self, experts: list[str]) -> str | None:
        """What this calibration lacks for a model with these experts (None: nothing)."""
        for expert in experts:
            if expert not in self.teacache or f"{expert}/cond" not in self.magcache:
                return f"expert {expert}"
        return None


def read_calibration(folder: str | Path) -> Calibration | None:
    """The folder's calibration (None: it has none); a malformed file is a ModelLoadError naming it."""
    path = Path(folder) / CALIBRATION_FILE
    if not path.exists():
        return None
    data = read_json_object(path, CALIBRATION_FILE)
    try:
        if data.get("format") != FORMAT:
            raise ValueError(f"format must be {FORMAT}")
        steps = data["steps"]
        if not isinstance(steps, int) or not 2 <= steps <= 10000:
            raise ValueError("steps must be an integer 2..10000")
        teacache = {str(k): _numbers(v, 1, DEGREE + 1) for k, v in data["teacache"].items()}
        magcache = {str(k): _numbers(v, steps, steps) for k, v in data["magcache"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"{CALIBRATION_FILE} is not a cache calibration ({exc}); run vidloom calibrate-cache "
                             "again", file=str(path)) from None
    return Calibration(steps, teacache, magcache, int(data.get("prompts", 0)))


def _numbers(values, low: int, high: int) -> list[float]:
    if not isinstance(values, list) or not low <= len(values) <= high:
        raise ValueError(f"a list of {low}..{high} numbers expected")
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        raise ValueError("numbers must be finite")
    return out


def write_calibration(folder: str | Path, calibration: Calibration) -> Path:
    path = Path(folder) / CALIBRATION_FILE
    write_json(path, {"format": FORMAT, "steps": calibration.steps, "prompts": calibration.prompts,
                      "teacache": calibration.teacache, "magcache": calibration.magcache})
    return path


class RecordingCall:
    """The plain forward (composed: embed, blocks, head) that records, per request, expert and
    branch, each step's measures against the step before."""

    def __init__(self, sequence=None):
        self.sequence = sequence
        self.last: dict = {}
        self.records: list[tuple] = []  # (request, expert, branch, step, steps, input change, residual change, ratio)

    def batch_key(self, batch, expert):
        return None

    def exchanged(self, prediction, rows):
        return prediction

    @torch.no_grad()
    def __call__(self, model, x, t, context_kv, rows):
        owner = rows.owners[0]
        with sequence_parallel(self.sequence):
            tokens = model.embed(x, t)
            out = run_blocks(list(model.blocks), tokens, list(context_kv), tokens.x)
            start = 0
            for branch, size in zip(rows.branches, rows.sizes):
                span = slice(start, start + size)
                start += size
                inp = model.blocks[0].attention_input(tokens.x[span], tokens.modulation[span], tokens.runs)
                residual = out[span] - tokens.x[span]
                key = (id(owner), rows.expert, branch)
                if key in self.last:
                    before_inp, before_res = self.last[key]
                    ratio = float(residual.float().abs().mean() / before_res.float().abs().mean().clamp_min(1e-12))
                    self.records.append((id(owner), rows.expert, branch, owner.step, owner.num_steps,
                                         relative_l1(inp, before_inp), relative_l1(residual, before_res), ratio))
                self.last[key] = (inp, residual)
            return model.head(out, tokens)


def fit(records: list[tuple], steps: int, prompts: int) -> Calibration:
    """TeaCache's polynomials and MagCache's curves from the recorded measures."""
    teacache, magcache = {}, {}
    for expert in sorted({r[1] for r in records}):
        pairs = np.array([(r[5], r[6]) for r in records if r[1] == expert])
        if len(pairs) < DEGREE + 1:
            raise ValueError(f"{len(pairs)} steps recorded for {expert}: calibrate with more steps or prompts")
        teacache[expert] = [float(c) for c in np.polyfit(pairs[:, 0], pairs[:, 1], DEGREE)]
        for branch in sorted({r[2] for r in records if r[1] == expert}):
            curve = np.ones(steps)
            for step in range(steps):
                ratios = [r[7] for r in records if r[1] == expert and r[2] == branch and r[3] == step]
                if ratios:
                    curve[step] = float(np.mean(ratios))
            magcache[f"{expert}/{branch}"] = [float(v) for v in curve]
    return Calibration(steps, teacache, magcache, prompts)


def predicted_speedups(records: list[tuple], calibration: Calibration, specs: list) -> dict[str, float]:
    """For each spec (TeaCache or MagCache), the speed-up its rule would give on the recorded runs:
    steps / steps computed, over every request, expert and branch (the skips change what follows,
    so the measured speed-up differs somewhat)."""
    from .policies import MagCachePolicy
    from .spec import TeaCache

    runs: dict = {}
    for r in records:
        runs.setdefault((r[0], r[1], r[2]), []).append(r)
    out = {}
    for spec in specs:
        total = computed = 0
        for (_, expert, branch), steps in runs.items():
            steps = sorted(steps, key=lambda r: r[3])
            total += len(steps) + 1  # the run's first step has no record: computed
            computed += 1
            acc, ratio, skips = 0.0, 1.0, 0
            for r in steps:
                last = r[3] >= r[4] - 1
                if isinstance(spec, TeaCache):
                    acc += max(float(np.polyval(calibration.teacache[expert], r[5])), 0.0)
                    skip = acc < spec.threshold
                else:
                    early = r[3] < spec.retention * r[4]
                    ratio *= MagCachePolicy(spec, calibration.magcache).ratio(f"{expert}/{branch}", r[3], r[4])
                    acc += abs(1 - ratio)
                    skip = not early and acc < spec.threshold and skips < spec.max_skips
                if skip and not last:
                    skips += 1
                else:
                    computed += 1
                    acc, ratio, skips = 0.0, 1.0, 0
        out[spec.text()] = total / max(computed, 1)
    return out


def calibrate(generator, prompts: list[str], steps: int, **sampling) -> tuple[Calibration, list[tuple]]:
    """Run ``prompts`` uncached at ``steps`` steps through a recording call; returns the fitted
    calibration and the records."""
    stage = generator.pipeline.denoising
    recorder = RecordingCall(getattr(stage.call, "sequence", None))
    previous, stage.call = stage.call, recorder
    try:
        for i, prompt in enumerate(prompts):
            generator.generate(prompt, num_inference_steps=steps, seed=i, output_type="latent", **sampling)
    finally:
        stage.call = previous
    return fit(recorder.records, steps, len(prompts)), recorder.records
