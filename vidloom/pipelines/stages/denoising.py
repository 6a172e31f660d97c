from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable

import torch

from ...config import SamplingParams
from ...errors import NumericalError
from ...lora import adapters_for_rows
from ...models.attention import sliding_window
from ...memory.residency import Fixed, Handle, handle_of
from ..base import IterativeStage, Phase, VerificationResult, is_tensor
from ..batch import ForwardBatch, PolicyState
from .model_call import COND, UNCOND, ModelCall, PlainCall, Rows, guided, split_rows


def request_guidance(params: SamplingParams) -> float:
    """The guidance of a request's (first) expert: ``guidance_scale``."""
    return params.guidance_scale


def low_noise_guidance(params: SamplingParams) -> float:
    """The guidance of Wan2.2's low-noise expert: ``guidance_scale_2``, defaulting to
    ``guidance_scale`` as diffusers does."""
    return params.guidance_scale if params.guidance_scale_2 is None else params.guidance_scale_2


@dataclasses.dataclass(frozen=True)
class Expert:
    """A transformer and the timesteps it serves, ``t >= min_timestep`` (experts are tried in
    order, so the last one takes all the rest), with how its guidance scale is read from a
    request. Wan2.1 has one expert; Wan2.2's A14B models a high-noise one above ``boundary_ratio x
    num_train_timesteps`` (``guidance_scale``) and a low-noise one below (``guidance_scale_2``)."""

    transformer: Handle | Fixed  # the transformer's handle (``memory.residency``); a module is wrapped
    min_timestep: float = -math.inf
    guidance: Callable[[SamplingParams], float] = request_guidance

    def __post_init__(self):
        object.__setattr__(self, "transformer", handle_of(self.transformer))

    def guidance_scale(self, params: SamplingParams) -> float:
        return self.guidance(params)


class ModelInput:
    """How a step's latents become the transformer's input and timestep: text-to-video gives them
    as they are, with one timestep per row. Families with image conditioning subclass it; the
    denoising loop is the same for all."""

    def prepare(self, batch: ForwardBatch, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (model input (B, C_in, F, H, W) float32, timestep (B,) or per token (B, tokens))."""
        return batch.latents, t.expand(batch.latents.shape[0])

    def finish(self, batch: ForwardBatch) -> None:
        """After the last step: what the latents become before decoding (as they are)."""


class ConcatCondition(ModelInput):
    """Wan2.1 image-to-video: ``conditioning.condition`` (frame mask and encoded frames)
    concatenated to the latents' channels at every step."""

    def prepare(self, batch, t):
        x, timestep = super().prepare(batch, t)
        return torch.cat([x, batch.conditioning.condition.to(x.dtype)], dim=1), timestep


class GivenFrames(ModelInput):
    """Wan2.2 TI2V: where ``conditioning.frame_mask`` is 0 (the first latent frame of an
    image-to-video request) the latents are replaced by the encoded image, and those tokens get
    timestep 0; the final latents are replaced the same way. Without conditioning (text-to-video
    from the same model) the latents go in as they are. As diffusers' ``expand_timesteps``."""

    def __init__(self, patch: tuple[int, int, int]):
        self.patch = patch

    def prepare(self, batch, t):
        c = batch.conditioning
        if c is None:
            return super().prepare(batch, t)
        x = self._replaced(batch.latents, c)
        pt, ph, pw = self.patch
        # one value per token, (f, h, w) order: the mask at every patch's first position times t
        per_token = (c.frame_mask[0, 0, ::pt, ::ph, ::pw] * t).flatten()
        return x, per_token[None].expand(x.shape[0], -1)

    def finish(self, batch):
        if batch.conditioning is not None:
            batch.latents = self._replaced(batch.latents, batch.conditioning)

    @staticmethod
    def _replaced(latents: torch.Tensor, c) -> torch.Tensor:
        mask = c.frame_mask.to(latents)
        return (1 - mask) * c.condition.to(latents) + mask * latents


class DenoisingStage(IterativeStage):
    """The denoising loop, one scheduler step per unit.

    Per step: the expert for the step's timestep on the conditional (and, with guidance,
    unconditional) embeddings, classifier-free guidance with that expert's scale, then the
    scheduler step. Latents stay float32 between steps; the DiT sees them in its own dtype, as
    the reference does. Each expert's text keys and values are computed once, when it first runs
    (timesteps only decrease, so an expert left behind is never needed again).
    """

    name = "denoising"
    phase = Phase.DENOISING

    def __init__(self, transformer: torch.nn.Module | Handle | list[Expert], scheduler, batch_cfg: bool = True,
                 check_finite: bool = True, cfg=None, model_input: ModelInput | None = None,
                 steps=None, call: ModelCall | None = None):
        """``transformer``: one transformer (a handle, or a module), or the experts in order;
        ``call``: what runs every transformer forward (default: ``PlainCall()``, the plain forward
        in this process; the pipeline gives ``PlainCall(sequence)`` under sequence parallelism, or
        a policy wrapping it); ``cfg``: a CFG-parallel object (``parallel.cfg``) when the two
        branches run on different processes (None in one process). ``model_input``: how the
        latents (and the request's conditioning) become the transformer's input (default: as they
        are). ``steps(request)``: how many steps this stage runs, from ``batch.begin_index`` on
        (default: the request's ``num_inference_steps``; a refine pass runs its own). Where each
        expert lives while it runs is its handle's residency policy's choice (``memory``)."""
        self.experts = list(transformer) if isinstance(transformer, (list, tuple)) else [Expert(transformer)]
        self.model_input = model_input or ModelInput()
        self.steps = steps or (lambda params: params.num_inference_steps)
        self.scheduler = scheduler
        self.batch_cfg = batch_cfg
        self.check_finite = check_finite
        self.cfg = cfg
        self.call = call or PlainCall()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the transformer computes in, as the loader declared it."""
        return self.experts[0].transformer.dtype

    def num_units(self, batch: ForwardBatch) -> int:
        return self.steps(batch.request or batch.params)

    def verify_input(self, batch: ForwardBatch) -> VerificationResult:
        r = VerificationResult(self.name, "input")
        r.check("latents", is_tensor(batch.latents, 5), "must be (B, C, F, H, W)")
        r.check("timesteps", is_tensor(batch.timesteps, 1), "must be prepared")
        r.check("prompt_embeds", is_tensor(batch.prompt_embeds, 3), "must be encoded")
        if batch.params.do_cfg:
            r.check("negative_embeds", is_tensor(batch.negative_embeds, 3), "must be encoded with guidance")
        return r

    def expert_index(self, t: torch.Tensor) -> int:
        """The expert that serves timestep ``t``."""
        value = float(t)
        return next((i for i, e in enumerate(self.experts) if value >= e.min_timestep), len(self.experts) - 1)

    @torch.no_grad()
    def context(self, batch: ForwardBatch, index: int, model: torch.nn.Module):
        """Expert ``index``'s text keys/values of every block, rows [cond; uncond], computed once
        per request and expert (only the current expert's are kept); ``model``: that expert's
        transformer, in use."""
        if batch.context_expert != index:
            embeds = batch.prompt_embeds
            if batch.params.do_cfg:
                embeds = torch.cat([batch.prompt_embeds, batch.negative_embeds])
            image = batch.conditioning.image_embeds if batch.conditioning is not None else None
            if image is not None:  # the same image tokens for both branches' rows
                image = image.to(embeds.dtype).repeat(embeds.shape[0] // batch.prompt_embeds.shape[0], 1, 1)
            batch.context_kv = model.encode_context(embeds, image)
            batch.context_expert = index
        return batch.context_kv

    def begin(self, batch: ForwardBatch) -> ForwardBatch:
        batch = super().begin(batch)
        batch.context_expert = None
        batch.num_steps = self.num_units(batch)
        # the call's memory of this request, new for each phase
        batch.policy_state = PolicyState(params=batch.params, num_steps=batch.num_steps)
        return batch

    def end(self, batch: ForwardBatch) -> ForwardBatch:
        self.model_input.finish(batch)
        report = batch.policy_state.report
        if self.cfg is not None:  # each process counted its own branch's work: the request's is their sum
            report = self.cfg.summed(report)
        for name, value in report.items():  # what the call's policy did, summed over phases
            batch.policy_report[name] = batch.policy_report.get(name, 0) + value
        return super().end(batch)

    @torch.no_grad()
    def predict(self, batch: ForwardBatch, t: torch.Tensor) -> torch.Tensor:
        """The guided model prediction at timestep ``t``."""
        index = self.expert_index(t)
        expert = self.experts[index]
        with expert.transformer.use() as model, request_window(batch.params), \
                adapters_for_rows(((0, None, batch.params.lora),) if batch.params.lora else None):
            return guided(self._branches(batch, t, model, index), expert.guidance_scale(batch.params))

    def _branches(self, batch: ForwardBatch, t: torch.Tensor, model: torch.nn.Module, index: int) -> dict:
        """Each CFG branch's prediction of expert ``index`` (``model``, in use), as the request's
        guidance and the engine's CFG layout have them computed."""
        kv, name = self.context(batch, index, model), self.experts[index].transformer.name
        x, timestep = self.model_input.prepare(batch, t)
        x = x.to(self.dtype)
        b = x.shape[0]
        if not batch.params.do_cfg:
            return {COND: self.call(model, x, timestep, kv, Rows.of(batch, (COND,), name))}
        if self.cfg is not None:  # one branch here, the other on the CFG partner
            rows = Rows.of(batch, (self.cfg.branch,), name)
            mine = self.call(model, x, timestep, _rows(kv, self.cfg.rows(b)), rows)
            return self.call.exchanged(dict(zip((COND, UNCOND), self.cfg.exchange(mine))), rows)
        if self.batch_cfg:  # both branches in one forward: x (2B, C, F, H, W), rows [cond; uncond] as kv's
            rows = Rows.of(batch, (COND, UNCOND), name)
            both = self.call(model, torch.cat([x, x]), torch.cat([timestep, timestep]), kv, rows)
            return dict(zip(rows.branches, split_rows(both, rows)))
        prediction = {}  # one forward per branch, each with its rows of the text keys/values
        for k, branch in enumerate((COND, UNCOND)):
            branch_kv = _rows(kv, slice(k * b, (k + 1) * b))
            prediction[branch] = self.call(model, x, timestep, branch_kv, Rows.of(batch, (branch,), name))
        return prediction

    def step(self, batch: ForwardBatch, index: int) -> ForwardBatch:
        t = batch.timestep(index)
        batch.policy_state.step = index
        return self._apply(batch, index, t, self.predict(batch, t))

    def _apply(self, batch: ForwardBatch, index: int, t: torch.Tensor, noise_pred: torch.Tensor) -> ForwardBatch:
        """The scheduler step from a guided prediction, checked; the batch's fields are assigned
        only once the new latents are known to be finite."""
        latents, scheduler_state = self.scheduler.step(
            batch.schedule, batch.scheduler_state, noise_pred, batch.latents
        )
        if self.check_finite and not torch.isfinite(latents).all():
            # fp16's range is what overflows in practice; in fp32/bf16 the weights or inputs are suspect
            hint = ("try fp32 or bf16 instead of fp16" if self.dtype == torch.float16
                    else f"the transformer runs in {str(self.dtype).removeprefix('torch.')}: check the weights and inputs")
            raise NumericalError(f"latents became NaN/Inf at timestep {float(t):g} ({hint})", step=index + 1)
        batch.latents, batch.scheduler_state = latents, scheduler_state
        batch.step_index = index + 1
        if batch.params.return_trajectory:
            batch.trajectory.append(latents.detach().clone())
        return batch

    # -- several requests in one forward ----------------------------------------------------------

    def batch_key(self, batch: ForwardBatch, index: int):
        """Requests whose steps may share one transformer forward have equal keys (None: never):
        the same expert, model-input shape and timestep kind, guided or not, and what the model
        call asks to be equal. Prompts, seeds, guidance scales, step counts and schedules may differ."""
        if self.cfg is not None or not self.batch_cfg or batch.conditioning is not None:
            return None
        expert = self.expert_index(batch.timestep(index))
        call_key = self.call.batch_key(batch, self.experts[expert])
        if call_key is None:
            return None
        return (expert, tuple(batch.latents.shape[1:]), batch.latents.dtype, batch.params.do_cfg,
                batch.params.sta_window, call_key)

    @torch.no_grad()
    def step_many(self, batches: list[ForwardBatch], indices: list[int]) -> list[ForwardBatch | BaseException]:
        """One step of each request (equal ``batch_key``), the transformer run once over all their
        rows; each request's guidance and scheduler step as in ``step``. Returns each request's
        batch, or the error that request alone met (e.g. NaN latents)."""
        ts = [b.timestep(i) for b, i in zip(batches, indices)]
        for batch, i in zip(batches, indices):
            batch.policy_state.step = i
        index = self.expert_index(ts[0])
        expert = self.experts[index]
        with expert.transformer.use() as model, request_window(batches[0].params):  # equal in the group
            xs, steps, kvs, owned = [], [], [], []
            spans, start = [], 0  # each request's rows and its adapters
            for batch, t in zip(batches, ts):
                x, timestep = self.model_input.prepare(batch, t)
                branches = (COND, UNCOND) if batch.params.do_cfg else (COND,)  # as context() orders its rows
                xs += [x.to(self.dtype)] * len(branches)
                steps += [timestep] * len(branches)
                lora = batch.params.lora
                with adapters_for_rows(((0, None, lora),) if lora else None):  # its own text keys/values
                    kvs.append(self.context(batch, index, model))
                owned.append(Rows.of(batch, branches, expert.transformer.name))
                rows = x.shape[0] * len(branches)
                if lora:
                    spans.append((start, start + rows, lora))
                start += rows
            # each block's keys/values of all requests as one batch (the model's own record knows how)
            stacked = [type(parts[0]).stack(list(parts)) for parts in zip(*kvs)]
            rows = Rows.joined(owned)
            with adapters_for_rows(tuple(spans)):
                blocks = iter(split_rows(self.call(model, torch.cat(xs), torch.cat(steps), stacked, rows), rows))
        results = []
        for batch, i, t, own in zip(batches, indices, ts, owned):
            prediction = {branch: next(blocks) for branch in own.branches}
            try:
                results.append(self._apply(batch, i, t, guided(prediction, expert.guidance_scale(batch.params))))
            except Exception as exc:  # noqa: BLE001 - this request's failure, not the others'
                results.append(exc)
        return results

    def verify_output(self, batch: ForwardBatch) -> VerificationResult:
        return VerificationResult(self.name, "output").check(
            "step_index", batch.step_index == batch.num_steps, f"must reach {batch.num_steps}"
        )


def request_window(params) -> contextlib.AbstractContextManager:
    """The request's sliding-tile window around its forwards: its own, dense for "dense", or (None)
    the engine's default, which the context around the unit already holds."""
    if params.sta_window is None:
        return contextlib.nullcontext()
    return sliding_window(None if params.sta_window == "dense" else params.sta_window)


def _rows(context_kv, rows: slice):
    return [kv.rows(rows) for kv in context_kv]
