"""Step distillation into a LoRA: a few-step, unguided sampler from a many-step, guided one.

    python -m vidloom.train.distill --model vidloom/assets/wan-shapes-64 --run-dir RUN \\
        --out vidloom/assets/wan-shapes-64/lora/distill-4step.safetensors [--set train_steps=800]

The method: trajectory distillation with endpoint targets, on the student's own rollouts.

1. Teacher targets. For each training caption and seed, the teacher (the folder's DiT and
   scheduler, ``teacher_steps`` steps with classifier-free guidance at ``guidance_scale``, the
   empty caption as the negative, as the engine runs it) maps a noise tensor to a clean latent.
   The flow ODE is deterministic, so each noise has exactly one target.
2. Student rollouts. The student is the same DiT with a low-rank adapter on its linear layers,
   run unguided (one row per video) for ``steps`` steps of the folder's own scheduler (UniPC),
   from the same noise. Its states along the way are taken without gradients.
3. Loss. At every state x_i (noise level sigma_i) the student's clean-latent estimate
   x0 = x_i - sigma_i * v(x_i) must equal the teacher's target for that noise: mean squared error
   over the states of the batch.

Why this and not progressive, consistency or distribution-matching distillation: the teacher's
deterministic map gives an exact target for every noise, with no second network (DMD's fake score)
and no rounds (progressive halving 20 -> 10 -> 5 cannot land on 4); training on the student's own
states removes the drift between training and sampling states that per-segment targets have; and
a sampler whose clean estimate is the same at every step ends exactly at that estimate for both
Euler and UniPC (every higher-order term is a difference of estimates), so the objective fits the
folder's multistep scheduler without changing it. The teacher runs once; a training step costs
``steps`` forwards without gradients and one forward and backward over ``steps`` times the batch.

Only training captions are used (``vidloom.world.train_specs``): the held-out combinations stay
unseen, as for the base model. The adapter is written in the diffusers/PEFT layout
(``transformer.<module>.lora_A.weight``, ``lora_B``, r and lora_alpha in ``lora_adapter_metadata``)
with the settings it was trained for in ``vidloom_sampling``: vidloom applies them to requests
that do not set them (``vidloom.lora.adapter_sampling``); diffusers loads the file as any adapter.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import VidloomError
from ..jsonfile import write_json
from ..models.encoders import WanTextEncoder
from ..models.wan_dit import WanDiT
from ..world.clips import train_specs
from .dit import caption_table
from .loop import Checkpointer, lr_at, read_safetensors, run_steps, write_safetensors
from .recipe import with_overrides

SAMPLING_KEY = "vidloom_sampling"  # the file's metadata field with the settings it was trained for


@dataclasses.dataclass
class DistillRecipe:
    steps: int = 4  # the student's steps (the folder's scheduler, no guidance)
    teacher_steps: int = 20
    guidance_scale: float = 3.0  # the teacher's
    flow_shift: float | None = None  # None: the folder's
    seeds_per_caption: int = 16
    num_frames: int = 17
    height: int = 64
    width: int = 64
    rank: int = 32
    alpha: float = 32.0
    targets: tuple[str, ...] = ("blocks.", "condition_embedder.time_embedder.", "condition_embedder.time_proj",
                                "proj_out")  # the linear layers adapted (name prefixes)
    lr: float = 1e-3
    warmup: int = 50
    train_steps: int = 800
    batch: int = 8
    teacher_batch: int = 32
    seed: int = 0
    checkpoint_minutes: float = 5.0
    log_every: int = 10


class LoraLinear(torch.nn.Module):
    """A frozen ``base`` linear layer plus a trainable low-rank update ``up @ down * alpha / rank``
    (``up`` starts at zero, so the adapted layer starts as the base)."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.down = torch.nn.Parameter(torch.empty(rank, base.in_features))
        self.up = torch.nn.Parameter(torch.zeros(base.out_features, rank))
        torch.nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.scale = alpha / rank

    @property
    def weight(self) -> torch.Tensor:  # what the model reads from a linear layer (its dtype)
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype)) * self.scale


def add_lora(dit: WanDiT, recipe: DistillRecipe) -> dict[str, LoraLinear]:
    """Swap each targeted ``nn.Linear`` of ``dit`` for a ``LoraLinear``; returns them by module name."""
    dit.requires_grad_(False)
    found = [(name, module) for name, module in dit.named_modules()
             if isinstance(module, torch.nn.Linear) and name.startswith(recipe.targets)]
    adapted = {}
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        parent = dit.get_submodule(parent_name) if parent_name else dit
        adapted[name] = LoraLinear(module, recipe.rank, recipe.alpha)
        setattr(parent, child, adapted[name])
    if not adapted:
        raise VidloomError(f"no linear layer matches the targets {recipe.targets}")
    return adapted


def lora_state(adapted: dict[str, LoraLinear]) -> dict[str, torch.Tensor]:
    """The adapter in the diffusers/PEFT layout ``WanPipeline.save_lora_weights`` writes (diffusers'
    module names: ``ffn.net.0.proj``, ``attn1.to_out.0``)."""
    from ..loader.weights import param_to_checkpoint_name

    tensors = {}
    for name, layer in adapted.items():
        module = param_to_checkpoint_name(WanDiT, f"{name}.weight").removesuffix(".weight")
        tensors[f"transformer.{module}.lora_A.weight"] = layer.down.detach().float().contiguous()
        tensors[f"transformer.{module}.lora_B.weight"] = layer.up.detach().float().contiguous()
    return tensors


def latent_shape(dit: WanDiT, vae_config, recipe: DistillRecipe) -> tuple[int, ...]:
    t, s = vae_config.temporal_factor, vae_config.spatial_factor
    return (dit.config.in_channels, (recipe.num_frames - 1) // t + 1, recipe.height // s, recipe.width // s)


def guided(dit, x, t, context, empty, guidance_scale: float) -> torch.Tensor:
    """The teacher's velocity: both branches in one forward, combined as the engine does."""
    b = x.shape[0]
    v = dit(torch.cat([x, x]), t.expand(2 * b), torch.cat([context, empty.expand(b, -1, -1)]))
    cond, uncond = v[:b].float(), v[b:].float()
    return uncond + guidance_scale * (cond - uncond)


@torch.no_grad()
def sample(dit, scheduler, steps: int, shift: float, noise, context, empty=None, guidance_scale: float = 1.0,
           autocast: bool = False, keep_states: bool = False):
    """Run ``steps`` steps of ``scheduler`` from ``noise``; with ``empty`` the guided teacher,
    without it the unguided student. Returns the clean latent and, with ``keep_states``, the
    states each step started from with their timesteps and noise levels."""
    schedule = scheduler.schedule(steps, shift=shift)
    state, x = scheduler.init_state(), noise.float()
    states, timesteps, sigmas = [], [], []
    for i in range(steps):
        t = schedule.timesteps[i].expand(x.shape[0])
        if keep_states:
            states.append(x)
            timesteps.append(t)
            sigmas.append(schedule.sigmas[i].float().expand(x.shape[0]))
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            v = (guided(dit, x, t[:1], context, empty, guidance_scale) if empty is not None
                 else dit(x, t, context).float())
        x, state = scheduler.step(schedule, state, v, x)
    if keep_states:
        return x, (torch.cat(states), torch.cat(timesteps), torch.cat(sigmas))
    return x


def teacher_targets(dit, scheduler, shift: float, recipe: DistillRecipe, table, ids, empty_id: int, shape,
                    path: Path, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, clean latent) for every (caption, seed) pair in ``ids``; cached in ``path``."""
    if path.is_file():
        cached, _ = read_safetensors(path, "the teacher's targets")
        if cached["noise"].shape[0] == len(ids):
            return cached["noise"], cached["target"]
    generator = torch.Generator().manual_seed(recipe.seed)
    noise = torch.randn((len(ids), *shape), generator=generator)
    targets = []
    began = time.time()
    for start in range(0, len(ids), recipe.teacher_batch):
        rows = slice(start, start + recipe.teacher_batch)
        targets.append(sample(dit, scheduler, recipe.teacher_steps, shift, noise[rows], table[ids[rows]],
                              table[empty_id:empty_id + 1], recipe.guidance_scale, autocast))
        done = min(start + recipe.teacher_batch, len(ids))
        print(f"teacher: {done}/{len(ids)} videos, {time.time() - began:.0f} s", flush=True)
    target = torch.cat(targets)
    if not torch.isfinite(target).all():
        raise VidloomError("the teacher's targets are not finite: check the model folder")
    write_safetensors(path, {"noise": noise, "target": target}, {"format": "pt"})
    return noise, target


class Adapter(torch.nn.Module):
    """The trainable part alone, for the optimizer and the checkpoint."""

    def __init__(self, adapted: dict[str, LoraLinear]):
        super().__init__()
        self.layers = torch.nn.ModuleDict({name.replace(".", "/"): layer for name, layer in adapted.items()})

    def state_dict(self, *args, **kwargs):
        return {k: v for k, v in super().state_dict(*args, **kwargs).items() if k.endswith((".down", ".up"))}

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        return super().load_state_dict(state, strict=False, assign=assign)


def distill(model_dir: Path, run_dir: Path, recipe: DistillRecipe, autocast: bool, minutes: float | None = None):
    """Train the adapter; returns (its tensors in the diffusers layout, a summary)."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    from ..loader.weights import load_model
    from ..models.wan_vae import WanVAEConfig
    from ..schedulers import scheduler_from_config

    run_dir.mkdir(parents=True, exist_ok=True)
    scheduler = scheduler_from_config(model_dir)
    shift = recipe.flow_shift if recipe.flow_shift is not None else scheduler.config.flow_shift
    dit = load_model(WanDiT, model_dir / "transformer").eval()
    vae_config = WanVAEConfig.from_dict(json.loads((model_dir / "vae" / "config.json").read_text()))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir / "tokenizer"), local_files_only=True)
    encoder = UMT5EncoderModel.from_pretrained(str(model_dir / "text_encoder"), local_files_only=True,
                                               use_safetensors=True).eval()
    captions = [spec.caption for spec in train_specs()]
    table, index = caption_table(WanTextEncoder(tokenizer, encoder), captions)
    empty_id = index[""]
    ids = torch.tensor([index[c] for c in captions for _ in range(recipe.seeds_per_caption)])
    shape = latent_shape(dit, vae_config, recipe)
    began = time.time()
    noise, target = teacher_targets(dit, scheduler, shift, recipe, table, ids, empty_id, shape,
                                    run_dir / "teacher.safetensors", autocast)
    teacher_s = time.time() - began

    adapted = add_lora(dit, recipe)
    adapter = Adapter(adapted)
    params = [p for p in adapter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ckpt = Checkpointer(run_dir, "distill")
    np_rng = np.random.default_rng(recipe.seed + 1)
    start, total = ckpt.restore(model=adapter, optimizer=opt, np_rng=np_rng) or (0, recipe.train_steps)

    def step_fn(step: int, total: int) -> dict:
        rows = torch.from_numpy(np_rng.choice(len(ids), recipe.batch, replace=False))
        context = table[ids[rows]]
        _, (x, t, sigma) = sample(dit, scheduler, recipe.steps, shift, noise[rows], context, autocast=autocast,
                                  keep_states=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, recipe.lr, recipe.warmup)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            v = dit(x, t, context.repeat(recipe.steps, 1, 1))
        x0 = x - sigma.view(-1, 1, 1, 1, 1) * v.float()
        loss = F.mse_loss(x0, target[rows].repeat(recipe.steps, 1, 1, 1, 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return {"loss": loss.detach()}

    def save_fn(step: int, total: int) -> None:
        ckpt.save(model=adapter, optimizer=opt, np_rng=np_rng, step=step, total=total)

    began = time.time()
    reached, total = run_steps(start, total, step_fn, save_fn, run_dir / "distill_log.jsonl",
                               recipe.checkpoint_minutes, "distill", minutes, log_every=recipe.log_every)
    summary = {"recipe": {k: v for k, v in dataclasses.asdict(recipe).items()}, "flow_shift": shift,
               "teacher_videos": len(ids), "teacher_seconds": round(teacher_s, 1),
               "train_seconds_this_run": round(time.time() - began, 1), "steps_reached": reached, "total": total,
               "autocast": "bf16" if autocast else "none", "cpu": torch.backends.cpu.get_cpu_capability(),
               "threads": torch.get_num_threads()}
    return lora_state(adapted), summary, reached >= total


def write_adapter(path: Path, tensors: dict, recipe: DistillRecipe, shift: float) -> None:
    """The adapter file: diffusers/PEFT keys and metadata, and the settings it samples with."""
    path.parent.mkdir(parents=True, exist_ok=True)
    targets = sorted({key.removeprefix("transformer.").rsplit(".lora_", 1)[0] for key in tensors})
    metadata = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps({"transformer.r": recipe.rank, "transformer.lora_alpha": recipe.alpha,
                                             "transformer.target_modules": targets}),
        SAMPLING_KEY: json.dumps({"num_inference_steps": recipe.steps, "guidance_scale": 1.0, "flow_shift": shift}),
    }
    write_safetensors(path, tensors, metadata)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vidloom.train.distill")
    parser.add_argument("--model", type=Path, required=True, help="the teacher: a Diffusers-layout model folder")
    parser.add_argument("--run-dir", type=Path, required=True, help="teacher targets, checkpoints and logs")
    parser.add_argument("--out", type=Path, required=True, help="the adapter file to write (.safetensors)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--autocast", choices=("none", "bf16"), default="none")
    parser.add_argument("--minutes", type=float, default=None, help="stop (with a checkpoint) after this long")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        recipe = with_overrides(DistillRecipe(), args.overrides)  # the trainer's --set, on this recipe's fields
        tensors, summary, finished = distill(args.model, args.run_dir, recipe, args.autocast == "bf16", args.minutes)
    except VidloomError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_json(args.run_dir / "distill_summary.json", summary)
    if not finished:
        print(f"stopped at step {summary['steps_reached']} of {summary['total']}: run again to continue")
        return 0
    write_adapter(args.out, tensors, recipe, summary["flow_shift"])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
