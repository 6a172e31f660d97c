"""What both training phases share: checkpoints with exact resume, the learning-rate schedule,
EMA weights and the step loop with a progress bar and periodic checkpoints."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import ModelLoadError


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` then cosine decay to 5 % of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    params = dict(model.named_parameters())
    torch._foreach_lerp_([ema[n] for n in params], [p.detach() for p in params.values()], 1 - decay)


class CheckpointError(ModelLoadError):
    """A checkpoint or cache file in the run directory is not what the trainer wrote there (not a
    safetensors file, cut short, another phase's or preset's, keys missing); the message names it."""


CHECKPOINT_FORMAT = "vidloom.train phase checkpoint"
CHECKPOINT_VERSION = 1
META_KEY = "vidloom_train"  # the safetensors header's metadata entry holding the JSON part


def read_safetensors(path: Path, what: str, device: torch.device | str = "cpu",
                     tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (if ``tensors``) and the header's metadata of ``path``; any failure to read it is
    a CheckpointError naming the file. safetensors holds only tensors and strings: no code runs."""
    if not path.is_file():
        raise CheckpointError(f"{what} is not a file", file=str(path))
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            return ({k: f.get_tensor(k) for k in f.keys()} if tensors else {}), metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{what} is not a readable safetensors file ({exc})", file=str(path)) from exc


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``path`` atomically: a crash never leaves a half-written file under its name."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


class Checkpointer:
    """Saves and restores a phase's whole state (weights, EMA weights, optimizer, step and total,
    RNG states) as one safetensors file, ``RUN/<phase>.ckpt.safetensors``: the tensors under
    ``model/``, ``ema/``, ``optimizer/<index>/`` and ``rng/``, and in the header a JSON record of the
    rest (the phase, the step counters, the optimizer's hyper-parameters, numpy's generator state as
    plain ints). Nothing is unpickled. A file is checked against the live model and optimizer
    before any of it is applied: one that is not what this phase wrote is a CheckpointError."""

    def __init__(self, run_dir: Path, phase: str):
        self.phase = phase
        self.path = run_dir / f"{phase}.ckpt.safetensors"
        self.legacy = run_dir / f"{phase}.pt"  # the pickled format of earlier versions: never read

    def save(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, np_rng: np.random.Generator,
             step: int, total: int, ema: dict[str, torch.Tensor] | None = None,
             generator: torch.Generator | None = None) -> None:
        tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
        tensors.update({f"ema/{k}": v for k, v in (ema or {}).items()})
        opt = optimizer.state_dict()
        scalars = {}
        for index, entry in opt["state"].items():
            scalars[str(index)] = {k: v for k, v in entry.items() if not torch.is_tensor(v)}
            tensors.update({f"optimizer/{index}/{k}": v for k, v in entry.items() if torch.is_tensor(v)})
        tensors["rng/torch"] = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        tensors.update({f"rng/cuda/{i}": s for i, s in enumerate(cuda)})
        if generator is not None:
            tensors["rng/generator"] = generator.get_state()
        record = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "phase": self.phase, "step": step,
                  "total": total, "param_groups": opt["param_groups"], "optimizer_scalars": scalars,
                  "numpy_rng": np_rng.bit_generator.state}
        write_safetensors(self.path, tensors, {META_KEY: json.dumps(record)})

    def progress(self) -> tuple[int, int] | None:
        """(step reached, total steps) from the header alone; None without a checkpoint."""
        if not self._exists():
            return None
        _, record = self._read(tensors=False)
        return record["step"], record["total"]

    def restore(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, np_rng: np.random.Generator,
                device: torch.device | str = "cpu", ema: dict[str, torch.Tensor] | None = None,
                generator: torch.Generator | None = None) -> tuple[int, int] | None:
        """Load the checkpoint into the given objects (``ema`` updated in place) -> (step, total);
        None (nothing changed) without a checkpoint. Everything is checked before anything is set."""
        if not self._exists():
            return None
        tensors, record = self._read(device=device)
        expected = {f"model/{k}": v for k, v in model.state_dict().items()}
        expected.update({f"ema/{k}": v for k, v in (ema or {}).items()})
        expected["rng/torch"] = torch.get_rng_state()
        if generator is not None:
            expected["rng/generator"] = generator.get_state()
        cuda = [k for k in tensors if k.startswith("rng/cuda/")]
        if sorted(cuda) != sorted(f"rng/cuda/{i}" for i in range(len(cuda))):
            raise self._error("has CUDA generator states not numbered 0 to N - 1", "rng/cuda")
        cuda = [f"rng/cuda/{i}" for i in range(len(cuda))]
        for key in cuda:
            expected[key] = tensors[key]  # the saving machine's accelerators: restored for those present
        optimizer_state = self._optimizer_state(tensors, record, optimizer, expected)
        for key, want in expected.items():
            if key not in tensors:
                raise self._error("is missing a tensor", key)
            got = tensors[key]
            if got.shape != want.shape or got.dtype != want.dtype:
                raise self._error(f"holds {got.dtype} {tuple(got.shape)} where this phase needs {want.dtype} "
                                  f"{tuple(want.shape)} (another preset's checkpoint?)", key)
        if unexpected := sorted(set(tensors) - set(expected)):
            raise self._error("has a tensor this phase does not use", unexpected[0])
        if not _same_layout(record["numpy_rng"], np_rng.bit_generator.state):
            raise self._error(f"has a numpy generator state unlike this phase's "
                              f"{np_rng.bit_generator.state['bit_generator']}", "numpy_rng")
        try:
            model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
            for name, value in (ema or {}).items():
                value.copy_(tensors[f"ema/{name}"])
            optimizer.load_state_dict(optimizer_state)
            torch.set_rng_state(tensors["rng/torch"].cpu())
            np_rng.bit_generator.state = record["numpy_rng"]
            if generator is not None:
                generator.set_state(tensors["rng/generator"].cpu())
            for i, key in enumerate(cuda[:torch.cuda.device_count() if torch.cuda.is_available() else 0]):
                torch.cuda.set_rng_state(tensors[key].cpu(), i)
        except (RuntimeError, ValueError, TypeError, KeyError, OverflowError) as exc:
            raise CheckpointError(f"{self.phase} checkpoint does not fit ({exc})", file=str(self.path)) from exc
        return record["step"], record["total"]

    def _optimizer_state(self, tensors: dict, record: dict, optimizer: torch.optim.Optimizer,
                         expected: dict[str, torch.Tensor]) -> dict:
        """The optimizer's state dict from the checkpoint, checked against ``optimizer``: per
        parameter Adam's moments (their shapes added to ``expected``), and its parameter groups.
        The hyper-parameters come from the code; only the learning rate (reset every step) is
        taken from the file."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state: dict[int, dict] = {}
        for key in tensors:
            if key.startswith("optimizer/"):
                index, _, name = key[len("optimizer/"):].partition("/")
                if not index.isdigit() or int(index) >= len(params) or not name:
                    raise self._error(f"has optimizer state for none of the {len(params)} parameters", key)
                param = params[int(index)]
                shape, dtype = ((), torch.float32) if name == "step" else (param.shape, param.dtype)
                expected[key] = torch.empty(shape, dtype=dtype)
                state.setdefault(int(index), {})[name] = tensors[key]
        scalars = record["optimizer_scalars"]
        if (not isinstance(scalars, dict) or set(scalars) - {str(i) for i in state}
                or not all(isinstance(v, dict) for v in scalars.values())):
            raise self._error("has optimizer scalars that do not match its tensors", "optimizer_scalars")
        moments = {"step", "exp_avg", "exp_avg_sq"}  # what Adam(W) keeps per parameter it has stepped
        if any(group.get("amsgrad") for group in optimizer.param_groups):
            moments.add("max_exp_avg_sq")
        for index, entry in state.items():
            entry.update(scalars.get(str(index), {}))
            if isinstance(optimizer, torch.optim.Adam) and set(entry) != moments:
                raise self._error(f"has optimizer state {sorted(entry)} where Adam keeps {sorted(moments)}",
                                  f"optimizer/{index}")
        groups, current = record["param_groups"], optimizer.state_dict()["param_groups"]
        if not isinstance(groups, list) or len(groups) != len(current) or any(
                not isinstance(g, dict) or g.get("params") != c["params"] or not _is_real(g.get("lr"))
                for g, c in zip(groups, current)):
            raise self._error("has optimizer parameter groups that do not match this phase's optimizer",
                              "param_groups")
        return {"state": state, "param_groups": [{**c, "lr": float(g["lr"])} for g, c in zip(groups, current)]}

    def _exists(self) -> bool:
        if self.path.exists():
            return True
        if self.legacy.exists():
            raise CheckpointError(
                f"a {self.phase} checkpoint in the pickled format of earlier versions, which is never read "
                f"(unpickling can run code): delete it to train the {self.phase} phase again", file=str(self.legacy))
        return False

    def _error(self, problem: str, key: str) -> CheckpointError:
        return CheckpointError(f"{self.phase} checkpoint {problem}", file=str(self.path), key=key)

    def _read(self, device: torch.device | str = "cpu", tensors: bool = True) -> tuple[dict, dict]:
        out, metadata = read_safetensors(self.path, f"{self.phase} checkpoint", device, tensors)
        try:
            record = json.loads(metadata[META_KEY])
        except (KeyError, ValueError, RecursionError):
            raise self._error("has no training record in its header", META_KEY) from None
        if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
            raise self._error("is not a training checkpoint", "format")
        if record.get("version") != CHECKPOINT_VERSION:
            raise self._error(f"has version {record.get('version')!r}, this trainer reads {CHECKPOINT_VERSION}",
                              "version")
        if record.get("phase") != self.phase:
            raise self._error(f"was written by the {record.get('phase')!r} phase", "phase")
        for key in ("step", "total", "param_groups", "optimizer_scalars", "numpy_rng"):
            if key not in record:
                raise self._error("lacks an entry of its record", key)
        step, total = record.get("step"), record.get("total")
        for key, value in (("step", step), ("total", total)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise self._error(f"has {key} {value!r}, not an integer >= 0", key)
        if step > total:
            raise self._error(f"has step {step} beyond its total of {total}", "step")
        return out, record


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _same_layout(saved, current) -> bool:
    """Whether ``saved`` (from a file) has the keys and kinds of ``current``, a numpy generator's
    state: the same names, and non-negative integers below 2**128 where it has integers."""
    if isinstance(current, dict):
        return isinstance(saved, dict) and set(saved) == set(current) and all(
            _same_layout(saved[k], v) for k, v in current.items())
    if isinstance(current, str):
        return saved == current
    return isinstance(saved, int) and not isinstance(saved, bool) and 0 <= saved < 2**128


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(
    start: int, total: int, step_fn: Callable[[int, int], dict], save_fn: Callable[[int, int], None],
    log_path: Path, checkpoint_minutes: float, desc: str, minutes: float | None = None,
    fit_minutes: float | None = None, log_every: int = 10, device: torch.device | str = "cpu",
) -> tuple[int, int]:
    """Run ``step_fn(step, total) -> {"loss": tensor, ...}`` from ``start`` to ``total``; log every
    ``log_every`` steps (reading the figures back only then, so that an accelerator is not stalled
    every step), checkpoint with ``save_fn(step, total)`` every few minutes, at the end and when
    the time budget ``minutes`` runs out.

    ``fit_minutes`` (fresh runs only) shortens ``total`` so that the phase fits that budget: the
    pace is timed over steps 10-60, inside any learning-rate warm-up of 100 steps or more, so the
    steps before the decision do not depend on it, and the chosen total is saved with every
    checkpoint; rerunning with that total reproduces the run. Returns (step reached, total)."""
    from tqdm import tqdm

    device = torch.device(device)
    began = last_save = time.time()
    step = start
    fit_from, fit_to = 10, 60
    with tqdm(total=total, initial=start, desc=desc, unit="it", mininterval=2.0) as bar, open(log_path, "a") as log:
        while step < total:
            if fit_minutes is not None and start == 0 and step in (fit_from, fit_to):
                synchronize(device)
                if step == fit_from:
                    fit_began = time.time()
                else:
                    pace = (time.time() - fit_began) / (fit_to - fit_from)
                    fitted = step + int((fit_minutes * 60 - (time.time() - began)) / pace)
                    total = max(step + 1, min(total, fitted))
                    bar.total = total
                    print(f"{desc}: {pace * 1000:.1f} ms/step; {total} steps fit {fit_minutes:g} minutes", flush=True)
            out = step_fn(step, total)
            step += 1
            bar.update(1)
            if step % log_every == 0 or step == total:
                record = {k: float(v) for k, v in out.items()}
                bar.set_postfix({k: f"{v:.4f}" for k, v in record.items()})
                log.write(json.dumps({"step": step, **record, "time": time.time()}) + "\n")
            out_of_time = minutes is not None and time.time() - began > minutes * 60
            if step == total or out_of_time or time.time() - last_save > checkpoint_minutes * 60:
                log.flush()
                save_fn(step, total)
                last_save = time.time()
            if out_of_time:
                break
    return step, total
