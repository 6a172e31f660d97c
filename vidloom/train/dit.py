"""Phase 2: the DiT, trained with the flow-matching objective Wan uses.

Latents are encoded once with the trained VAE (posterior means) and normalised per channel;
the statistics become the VAE config's ``latents_mean`` / ``latents_std`` so that inference
undoes exactly this normalisation. Caption embeddings come from the frozen UMT5 encoder through
the same path as inference (clean, tokenise, pad to ``max_sequence_length``, zero the padding),
one per distinct caption. A dropped caption is replaced by the empty caption's embedding, which
is what classifier-free guidance uses as its unconditional branch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models.encoders import WanTextEncoder
from ..models.wan_dit import WanDiT, WanDiTConfig
from ..models.wan_vae import WanVAE
from .data import to_model_range
from .loop import Checkpointer, ema_update, lr_at, run_steps
from .recipe import DitPhase, Recipe

MAX_SEQUENCE_LENGTH = 512  # the inference default; the DiT cross-attends to every padded position


@torch.no_grad()
def encode_latents(vae: WanVAE, clips: np.ndarray, batch: int = 8) -> torch.Tensor:
    """(N, T, H, W, 3) uint8 -> (N, z, t, h, w) float32 posterior means (not normalised), on the VAE's device."""
    device = next(vae.parameters()).device
    out = [vae.encode_mean(to_model_range(clips[i:i + batch]).to(device)) for i in range(0, len(clips), batch)]
    return torch.cat(out)


def latent_stats(latents: torch.Tensor) -> tuple[list[float], list[float]]:
    dims = (0, 2, 3, 4)
    return latents.mean(dim=dims).tolist(), latents.std(dim=dims).clamp_min(1e-3).tolist()


@torch.no_grad()
def caption_table(text_encoder: WanTextEncoder, captions: list[str]) -> tuple[torch.Tensor, dict[str, int]]:
    """Embeddings (U + 1, L, D) of the distinct captions, the empty caption last."""
    unique = sorted(set(captions)) + [""]
    table = torch.cat([text_encoder.encode(unique[i:i + 16], MAX_SEQUENCE_LENGTH)
                       for i in range(0, len(unique), 16)])
    return table, {c: i for i, c in enumerate(unique)}


def sample_sigmas(n: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Logit-normal noise levels, shifted towards high noise as the sampler's flow shift does."""
    s = torch.sigmoid(torch.randn(n, generator=generator, device=generator.device))
    return shift * s / (1 + (shift - 1) * s)


def flow_matching_loss(dit: WanDiT, x0: torch.Tensor, context: torch.Tensor, sigmas: torch.Tensor,
                       noise: torch.Tensor, given_first: torch.Tensor | None = None,
                       first_latent_weight: float = 1.0) -> torch.Tensor:
    """Mean squared error of the predicted velocity. ``given_first`` (B,) bool: in those rows the
    first latent frame is the clean latent with timestep 0 on its tokens and no loss (what Wan2.2
    TI2V's image conditioning feeds the model: ``expand_timesteps``). ``first_latent_weight``: the
    first latent frame's loss weight where it is not given (the mean is over the weights)."""
    s = sigmas.view(-1, 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    target = noise - x0  # the velocity the flow-prediction scheduler integrates
    given = given_first is not None and bool(given_first.any())
    if not given and first_latent_weight == 1.0:
        return F.mse_loss(dit(xt, sigmas * 1000, context), target)
    b, _, f, h, w = x0.shape
    weight = torch.ones(b, 1, f, 1, 1, device=x0.device)
    weight[:, :, 0] = first_latent_weight
    timestep = sigmas * 1000
    if given:
        kept = torch.ones_like(weight)  # 0 where the frame is given
        kept[given_first, :, 0] = 0
        xt = kept * xt + (1 - kept) * x0
        weight = weight * kept
        pt, ph, pw = dit.config.patch_size
        timestep = (kept[:, 0, ::pt].expand(b, -1, h // ph, w // pw) * timestep.view(-1, 1, 1, 1)).flatten(1)
    err = (dit(xt, timestep, context) - target).pow(2) * weight
    return err.sum() / (weight.sum() * x0.shape[1] * h * w)


def train_dit(recipe: Recipe, latents: torch.Tensor, caption_ids: torch.Tensor, table: torch.Tensor,
              empty_id: int, run_dir: Path, minutes: float | None = None, fit_minutes: float | None = None,
              device: torch.device | str = "cpu", autocast: bool = False,
              phase: DitPhase | None = None) -> tuple[WanDiT, dict]:
    """Train (or resume) the DiT on normalised ``latents``; returns the model and its EMA weights
    (on ``device``). ``fit_minutes``: shorten the phase to fit that budget (see ``run_steps``).
    ``autocast``: bf16 autocast for the forward pass (weights, gradients and optimizer stay fp32).
    ``phase``: its settings (default: the recipe's text-to-video phase); an image-to-video phase
    starts from given weights and gives the first latent frame in a share of the rows."""
    phase = phase or recipe.t2v_phase()
    device = torch.device(device)
    ckpt = Checkpointer(run_dir, phase.name)
    np_rng = np.random.default_rng(recipe.seed + 2)
    generator = torch.Generator(device).manual_seed(recipe.seed + 3)
    torch.manual_seed(recipe.seed + 4)
    dit = WanDiT(WanDiTConfig.from_dict(recipe.dit_arch)).to(device)
    if phase.init is not None:
        dit.load_state_dict(phase.init)
    ema = {n: p.detach().clone() for n, p in dit.named_parameters()}
    opt = torch.optim.AdamW(dit.parameters(), lr=phase.lr, weight_decay=0.01, betas=(0.9, 0.99),
                            fused=device.type == "cuda")
    start, total = ckpt.restore(model=dit, optimizer=opt, np_rng=np_rng, device=device, ema=ema,
                                generator=generator) or (0, phase.steps)
    dit.train()
    latents, table, caption_ids = latents.to(device), table.to(device), caption_ids.to(device)

    def step_fn(step: int, total: int) -> dict:
        idx = torch.from_numpy(np_rng.integers(0, len(latents), phase.batch)).to(device)
        ids = caption_ids[idx].clone()
        drop = torch.rand(len(ids), generator=generator, device=device) < recipe.dit_caption_dropout
        ids = torch.where(drop, torch.full_like(ids, empty_id), ids)
        sigmas = sample_sigmas(len(idx), recipe.dit_timestep_shift, generator)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=generator, device=device)
        given = (torch.rand(len(ids), generator=generator, device=device) < phase.first_frame_prob
                 if phase.first_frame_prob > 0 else None)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, phase.lr, phase.warmup)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = flow_matching_loss(dit, x0, table[ids], sigmas, noise, given, phase.first_latent_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        ema_update(ema, dit, phase.ema)
        return {"loss": loss.detach()}

    def save_fn(step: int, total: int) -> None:
        ckpt.save(model=dit, optimizer=opt, np_rng=np_rng, step=step, total=total, ema=ema, generator=generator)

    run_steps(start, total, step_fn, save_fn, run_dir / f"{phase.name}_log.jsonl", recipe.checkpoint_minutes,
              phase.name, minutes, fit_minutes=fit_minutes, log_every=recipe.log_every, device=device)
    return dit.eval(), ema
