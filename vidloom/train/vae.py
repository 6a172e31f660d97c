"""Phase 1: the VAE, trained on clip reconstruction with a small KL term.

Object pixels (a few % of each frame) get a larger loss weight, otherwise the average
background satisfies the loss. The decoder is trained on its unclamped output (the
inference decode clamps to [-1, 1], whose gradient is zero where it saturates).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..models.wan_vae import WanVAE, WanVAEConfig
from .data import to_model_range
from .loop import Checkpointer, lr_at, run_steps
from .recipe import Recipe


def new_vae(recipe: Recipe, seed: int) -> WanVAE:
    torch.manual_seed(seed)
    vae = WanVAE(WanVAEConfig.from_dict(recipe.vae_arch))
    z = vae.config.z_dim
    with torch.no_grad():
        # start with little posterior noise: log-variance half of quant_conv's output near -6
        vae.quant_conv.bias[z:].fill_(-6.0)
    return vae


def vae_loss(vae: WanVAE, x: torch.Tensor, recipe: Recipe) -> tuple[torch.Tensor, dict]:
    mean, logvar = (m.float() for m in vae.encode(x))
    z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
    rec = vae.decode(z, clamp=False).float()  # the loss in fp32 under autocast too
    # object pixels: far from the background colour (the plain background fills the borders)
    background = x.flatten(2).median(dim=2).values[:, :, None, None, None]
    is_object = ((x - background).abs().amax(dim=1, keepdim=True) > 0.3).float()
    weight = 1 + (recipe.vae_object_weight - 1) * is_object
    l1 = (weight * (rec - x).abs()).mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
    with torch.no_grad():
        mse = (rec.clamp(-1, 1) - x).pow(2).mean()
        psnr = 10 * torch.log10(4.0 / mse.clamp_min(1e-10))  # range [-1, 1]: peak-to-peak 2
    return l1 + recipe.vae_kl_weight * kl, {"l1": l1.detach(), "kl": kl.detach(), "psnr": psnr}


def _resume(ckpt: Checkpointer, vae: WanVAE, opt, np_rng, total: int, device) -> tuple[int, int]:
    """A VAE phase's state from its checkpoint, if any -> (start step, total steps)."""
    return ckpt.restore(model=vae, optimizer=opt, np_rng=np_rng, device=device) or (0, total)


def _save(ckpt: Checkpointer, vae: WanVAE, opt, np_rng, step: int, total: int) -> None:
    ckpt.save(model=vae, optimizer=opt, np_rng=np_rng, step=step, total=total)


def train_vae(recipe: Recipe, clips: np.ndarray, run_dir: Path, minutes: float | None = None,
              fit_minutes: float | None = None, device: torch.device | str = "cpu", autocast: bool = False) -> WanVAE:
    """Train (or resume) the VAE in ``run_dir``; returns the VAE at the step reached.
    ``fit_minutes``: shorten the phase to fit that budget (see ``run_steps``).
    ``autocast``: bf16 autocast for the forward pass (weights, gradients and optimizer stay fp32)."""
    device = torch.device(device)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(run_dir, "vae")
    np_rng = np.random.default_rng(recipe.seed + 1)
    vae = new_vae(recipe, recipe.seed).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0, betas=(0.9, 0.99),
                            fused=device.type == "cuda")
    start, total = _resume(ckpt, vae, opt, np_rng, recipe.vae_steps, device)
    vae.train()
    data = torch.from_numpy(clips).to(device)  # uint8: the whole set fits an accelerator's memory
    n, t_total, size = len(clips), clips.shape[1], clips.shape[2]
    crop = min(recipe.vae_crop, size)

    def step_fn(step: int, total: int) -> dict:
        idx = torch.from_numpy(np_rng.integers(0, n, recipe.vae_batch)).to(device)
        t0 = int(np_rng.integers(0, t_total - recipe.vae_frames + 1))
        y0, x0 = (int(v) for v in np_rng.integers(0, size - crop + 1, 2))
        x = to_model_range(data[idx, t0:t0 + recipe.vae_frames, y0:y0 + crop, x0:x0 + crop])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, recipe.vae_lr, warmup=100)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss, info = vae_loss(vae, x, recipe)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return {"loss": loss.detach(), "psnr": info["psnr"]}

    def save_fn(step: int, total: int) -> None:
        _save(ckpt, vae, opt, np_rng, step, total)

    run_steps(start, total, step_fn, save_fn, run_dir / "vae_log.jsonl", recipe.checkpoint_minutes,
              "vae", minutes, fit_minutes=fit_minutes, log_every=recipe.log_every, device=device)
    return vae.eval()


DECODER_PREFIXES = ("decoder.", "post_quant_conv.")


def train_decoder(recipe: Recipe, vae: WanVAE, clips: np.ndarray, run_dir: Path, minutes: float | None = None,
                  device: torch.device | str = "cpu") -> WanVAE:
    """Train (or resume) the decoder phase: the decoder and ``post_quant_conv`` on whole clips
    (every frame), the encoder and ``quant_conv`` frozen, so the latents (and a DiT trained on
    them) are unchanged. Same loss as the VAE phase. Returns ``vae`` updated in place."""
    device = torch.device(device)
    ckpt = Checkpointer(run_dir, "decoder")
    np_rng = np.random.default_rng(recipe.seed + 6)
    vae = vae.to(device).requires_grad_(False)
    params = [p for n, p in vae.named_parameters() if n.startswith(DECODER_PREFIXES)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=recipe.decoder_lr, weight_decay=0.0, betas=(0.9, 0.99),
                            fused=device.type == "cuda")
    start, total = _resume(ckpt, vae, opt, np_rng, recipe.decoder_steps, device)
    vae.train()
    data = torch.from_numpy(clips).to(device)

    def step_fn(step: int, total: int) -> dict:
        idx = torch.from_numpy(np_rng.integers(0, len(clips), recipe.decoder_batch)).to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, recipe.decoder_lr, warmup=min(20, max(1, total // 10)))
        loss, info = vae_loss(vae, to_model_range(data[idx]), recipe)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return {"loss": loss.detach(), "psnr": info["psnr"]}

    def save_fn(step: int, total: int) -> None:
        _save(ckpt, vae, opt, np_rng, step, total)

    run_steps(start, total, step_fn, save_fn, run_dir / "decoder_log.jsonl", recipe.checkpoint_minutes,
              "decoder", minutes, log_every=recipe.log_every, device=device)
    return vae.requires_grad_(True).eval()


@torch.no_grad()
def reconstruction_psnr(vae: WanVAE, clips: np.ndarray, count: int = 16) -> tuple[float, list[float]]:
    """PSNR (dB, frames in [0, 1]) of the first ``count`` full-length clips through encode-mean
    and decode: the mean over clips, and per pixel frame (over all of them)."""
    device = next(vae.parameters()).device
    x = to_model_range(clips[:count]).to(device)
    rec = torch.cat([vae.decode(vae.encode_mean(x[i:i + 4])) for i in range(0, len(x), 4)])
    err = ((rec - x) / 2).pow(2)

    def db(mse: torch.Tensor) -> torch.Tensor:
        return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))

    return float(db(err.mean(dim=(1, 2, 3, 4))).mean()), db(err.mean(dim=(0, 1, 3, 4))).tolist()
