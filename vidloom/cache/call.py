"""``CachingCall``: the denoising stage's model call with each request's feature cache.

A request without ``cache`` goes to the inner call untouched (and may share forwards with other
such requests). A request with one never shares a forward (its skips are its own); its policies
run on its rows, with their memory in the request's ``PolicyState`` keyed by expert and CFG
branch, so interleaved or batched requests, both CFG branches and both experts of a Wan2.2 model
never see each other's state. What was computed and skipped is added to ``PolicyState.report``.
"""

from __future__ import annotations

import math

import torch

from ..models.attention import sequence_parallel
from ..pipelines.batch import PolicyState
from ..pipelines.stages.model_call import COND, UNCOND, Rows, split_rows
from .policies import ChangeMeter, policy_for
from .pab import broadcasting
from .spec import PAB, CacheSpec, parse_cache


def _kv_rows(context_kv: list, rows: slice) -> list:
    return [kv.rows(rows) for kv in context_kv]


def _add(report: dict, **counts) -> None:
    for name, value in counts.items():
        report[name] = report.get(name, 0) + value


class CachingCall:
    """Wraps the stage's ``PlainCall`` (``inner``); ``sequence``: its sequence-parallel object,
    under which composed forwards run too."""

    def __init__(self, inner, sequence=None, calibration=None, cfg=None):
        """``calibration``: the folder's ``cache.calibrate.Calibration`` (TeaCache's polynomial,
        MagCache's ratios), or None; ``cfg``: the CFG-parallel object when each process computes
        one branch (the gate then completes the predictions after their exchange, ``exchanged``)."""
        self.inner = inner
        self.sequence = sequence
        self.calibration = calibration
        self.cfg = cfg

    def batch_key(self, batch, expert):
        if parse_cache(batch.params.cache) is not None:
            return None  # a cached request's steps are its own: never shared with another's
        return self.inner.batch_key(batch, expert)

    def __call__(self, model, x, t, context_kv, rows: Rows):
        owner = rows.owners[0]
        spec = parse_cache(owner.params.cache) if owner is not None and owner.params is not None else None
        if spec is None:
            return self.inner(model, x, t, context_kv, rows)
        gate = spec.cfg_gate
        if gate is not None and _gate_open(gate, owner, rows.expert):
            gated = self._gated(model, x, t, context_kv, rows, spec, owner)
            if gated is not None:
                return gated
        out = self._computed(model, x, t, context_kv, rows, spec, owner)
        if gate is not None and self.cfg is None:  # under CFG parallel: once both are here (exchanged)
            self._remember_difference(out, rows, owner)
        return out

    def exchanged(self, prediction, rows):
        """CFG parallel: the gate's unconditional prediction from this step's conditional one
        (the unconditional process computed nothing), or, on a computed step, the difference a
        later gated step reuses. Both processes hold the same state, so they decide alike."""
        owner = rows.owners[0]
        spec = parse_cache(owner.params.cache) if owner is not None and owner.params is not None else None
        if spec is None or spec.cfg_gate is None:
            return prediction
        if _gate_open(spec.cfg_gate, owner, rows.expert):
            return {COND: prediction[COND], UNCOND: prediction[COND] - owner.values[("cfg-gate", "diff", rows.expert)]}
        owner.values[("cfg-gate", "diff", rows.expert)] = prediction[COND] - prediction[UNCOND]
        return prediction

    # --- CFG gating -----------------------------------------------------------------------------
    def _remember_difference(self, out: torch.Tensor, rows: Rows, owner: PolicyState) -> None:
        """After a computed forward: the conditional output of this step, and once both branches
        of a step are known, their difference (what a gated step reuses)."""
        parts = dict(zip(rows.branches, split_rows(out, rows)))
        values = owner.values
        if COND in parts:
            values[("cfg-gate", "cond", rows.expert)] = (owner.step, parts[COND])
        if UNCOND in parts:
            step, cond = values.get(("cfg-gate", "cond", rows.expert), (None, None))
            if step == owner.step:
                values[("cfg-gate", "diff", rows.expert)] = cond - parts[UNCOND]

    def _gated(self, model, x, t, context_kv, rows: Rows, spec: CacheSpec, owner: PolicyState):
        """This forward with the unconditional rows not computed (None: it cannot be gated: no
        difference yet, or, with split CFG, no conditional output of this step)."""
        diff = owner.values.get(("cfg-gate", "diff", rows.expert))
        if diff is None or UNCOND not in rows.branches:
            return None
        if rows.branches == (UNCOND,) and self.cfg is not None:  # the other process computes the conditional
            _add(owner.report, uncond_skipped=1)
            return torch.zeros_like(diff)  # a stand-in for the exchange; ``exchanged`` replaces it
        if rows.branches == (UNCOND,):  # split CFG: the conditional rows ran just before
            step, cond = owner.values.get(("cfg-gate", "cond", rows.expert), (None, None))
            if step != owner.step:
                return None
            _add(owner.report, uncond_skipped=1)
            return cond - diff
        n = rows.sizes[0]  # batched CFG: [cond; uncond], as many rows each
        cond_rows = Rows(rows.owners[:1], (COND,), rows.sizes[:1], rows.expert)
        cond = self._computed(model, x[:n], t[:n], _kv_rows(context_kv, slice(0, n)), cond_rows, spec, owner)
        owner.values[("cfg-gate", "cond", rows.expert)] = (owner.step, cond)
        _add(owner.report, uncond_skipped=1)
        return torch.cat([cond, cond - diff])

    # --- the feature cache ----------------------------------------------------------------------
    def _computed(self, model, x, t, context_kv, rows: Rows, spec: CacheSpec, owner: PolicyState):
        _add(owner.report, forwards=len(rows.branches))
        if spec.blocks is None:
            return self.inner(model, x, t, context_kv, rows)
        if isinstance(spec.blocks, PAB):
            with broadcasting(model, spec.blocks, rows, owner):
                return self.inner(model, x, t, context_kv, rows)
        with sequence_parallel(self.sequence):
            return skipping_forward(model, x, t, context_kv, rows, owner, policy_for(spec.blocks, self.calibration),
                                    self.sequence)


def _gate_open(gate, owner: PolicyState, expert: str) -> bool:
    """Whether this step of ``expert`` skips the unconditional branch: past the gate's fraction
    of the steps, with a difference of the two branches known."""
    return owner.step >= math.ceil(gate.after * owner.num_steps) and ("cfg-gate", "diff", expert) in owner.values


def skipping_forward(model, x, t, context_kv, rows: Rows, owner: PolicyState, policy, sequence=None) -> torch.Tensor:
    """The DiT forward with blocks ``policy.span(n)`` of each row block (a CFG branch) skipped
    where ``policy.decide`` says so, their residual (output minus input) reused from the last
    step that ran them. The first and last steps of a phase, and an expert's first step, always
    run them. The blocks before and after the span always run. Under sequence parallelism
    (``sequence``) the changes a policy measures are over the whole sequence, the same on every rank."""
    tokens = model.embed(x, t)
    measure = ChangeMeter(sequence, math.prod(tokens.grid))
    blocks, kv = list(model.blocks), list(context_kv)
    first, stop = policy.span(len(blocks))
    h = run_blocks(blocks[:first], tokens, kv[:first], tokens.x)
    forced = owner.step == 0 or owner.step >= owner.num_steps - 1
    spans, computing, start = [], [], 0
    for branch, size in zip(rows.branches, rows.sizes):
        span, key = slice(start, start + size), (policy.name, rows.expert, branch)
        state = owner.values.setdefault(key, {"expert": rows.expert, "curve": f"{rows.expert}/{branch}"})
        skip = policy.decide(state, model, tokens, h, span, owner, measure) and "residual" in state and not forced
        spans.append((span, state))
        computing.append(not skip)
        start += size
    if len(spans) > 2:
        raise ValueError("feature cache: a cached forward holds one request's rows (one or two CFG branches)")
    mid = h.clone() if not all(computing) else None
    if any(computing):  # the skippable blocks once, over the rows of every branch that computes
        chosen = [span for (span, _), c in zip(spans, computing) if c]
        # a forward has one or two row blocks (a request's CFG branches): the chosen ones are adjacent
        rows_of = slice(chosen[0].start, chosen[-1].stop)
        ran = run_blocks(blocks[first:stop], tokens, [k.rows(rows_of) for k in kv[first:stop]], h[rows_of], rows_of)
        if mid is None:
            mid = ran
        else:
            mid[rows_of] = ran
    for (span, state), computed in zip(spans, computing):
        if computed:
            residual = mid[span] - h[span]
            policy.computed(state, residual)
            state["residual"] = residual
            _add(owner.report, blocks_computed=stop - first)
        else:
            mid[span] = h[span] + state["residual"]
            _add(owner.report, blocks_skipped=stop - first, estimated_change=policy.estimate(state))
    out = run_blocks(blocks[stop:], tokens, kv[stop:], mid)
    _add(owner.report, blocks_computed=(len(blocks) - (stop - first)) * len(spans))  # the always-run ones
    return model.head(out, tokens)


def run_blocks(blocks: list, tokens, context_kv: list, x: torch.Tensor, rows_of: slice | None = None):
    """``blocks`` in order over ``x`` (the rows ``rows_of`` of the forward, with their modulation)."""
    modulation = tokens.modulation if rows_of is None else tokens.modulation[rows_of]
    for block, kv in zip(blocks, context_kv):
        x = block(x, kv, modulation, tokens.positions, tokens.runs)
    return x
