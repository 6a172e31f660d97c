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


class Checkpointer:
    """Saves and restores a phase's whole state: modules, optimizer, step, RNG states, log."""

    def __init__(self, path: Path):
        self.path = path

    def save(self, state: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)  # atomic: a crash never leaves a half-written checkpoint

    def load(self, device: torch.device | str = "cpu") -> dict | None:
        return torch.load(self.path, weights_only=False, map_location=device) if self.path.is_file() else None


def rng_state(np_rng: np.random.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np_rng.bit_generator.state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, np_rng: np.random.Generator) -> None:
    torch.set_rng_state(state["torch"].cpu())
    np_rng.bit_generator.state = state["numpy"]
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


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
