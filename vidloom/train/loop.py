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
    for name, p in model.named_parameters():
        ema[name].lerp_(p.detach(), 1 - decay)


class Checkpointer:
    """Saves and restores a phase's whole state: modules, optimizer, step, RNG states, log."""

    def __init__(self, path: Path):
        self.path = path

    def save(self, state: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)  # atomic: a crash never leaves a half-written checkpoint

    def load(self) -> dict | None:
        return torch.load(self.path, weights_only=False) if self.path.is_file() else None


def rng_state(np_rng: np.random.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np_rng.bit_generator.state}


def restore_rng(state: dict, np_rng: np.random.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np_rng.bit_generator.state = state["numpy"]


def run_steps(
    start: int, total: int, step_fn: Callable[[int], float | dict], save_fn: Callable[[int], None],
    log_path: Path, checkpoint_minutes: float, desc: str, minutes: float | None = None,
) -> int:
    """Run ``step_fn(step) -> loss`` (or a dict with "loss" and other figures to log) from ``start`` to
    ``total``; checkpoint every few minutes, at the
    end and when the time budget ``minutes`` runs out. Returns the step reached."""
    from tqdm import tqdm

    began = last_save = time.time()
    step = start
    with tqdm(total=total, initial=start, desc=desc, unit="it", mininterval=2.0) as bar, open(log_path, "a") as log:
        while step < total:
            out = step_fn(step)
            record = out if isinstance(out, dict) else {"loss": out}
            step += 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in record.items()})
            log.write(json.dumps({"step": step, **record, "time": time.time()}) + "\n")
            out_of_time = minutes is not None and time.time() - began > minutes * 60
            if step == total or out_of_time or time.time() - last_save > checkpoint_minutes * 60:
                log.flush()
                save_fn(step)
                last_save = time.time()
            if out_of_time:
                break
    return step
