"""Pyramid attention broadcast (``pab:<self every>:<cross every>``): in the middle of the schedule
(from 10 % to 90 % of the steps) each block's self-attention output is computed every n-th step
and reused between, its cross-attention output every m-th step (m > n: cross-attention changes
least); outside that range every step computes both.

The model file knows nothing of it: the first time a model runs a PAB request, its attention
modules get a subclass whose ``forward`` asks the active ``ReusePlan`` (a context variable set
for the one forward of one request) whether to compute or to reuse; without a plan it is the
module's own forward, unchanged. Outputs are kept in the request's ``PolicyState``, per expert,
CFG branches and block."""

from __future__ import annotations

import contextlib
import contextvars
import math

import torch

from .spec import PAB

START, END = 0.1, 0.9  # the part of the schedule where outputs are broadcast
_PLAN: contextvars.ContextVar = contextvars.ContextVar("vidloom_attention_reuse", default=None)
_SUBCLASSES: dict[type, type] = {}


def _forward(self, *args, **kwargs):
    base = type(self).__mro__[1].forward  # the attention class's own forward
    plan = _PLAN.get()
    if plan is None:
        return base(self, *args, **kwargs)
    return plan.run(self, lambda: base(self, *args, **kwargs))


def make_reusable(model: torch.nn.Module) -> dict[int, tuple[int, str]]:
    """Give ``model``'s blocks' attention modules the plan-aware forward (once); returns each
    module's (block index, "self" / "cross") by id."""
    names = {}
    for i, block in enumerate(model.blocks):
        for kind, module in (("self", block.attn1), ("cross", block.attn2)):
            cls = type(module)
            if not getattr(cls, "_vidloom_reusable", False):
                sub = _SUBCLASSES.setdefault(cls, type(f"Reusable{cls.__name__}", (cls,),
                                                       {"forward": _forward, "_vidloom_reusable": True}))
                module.__class__ = sub
            names[id(module)] = (i, kind)
    return names


class ReusePlan:
    """One forward of one request: which attention kinds compute this step, where outputs are kept."""

    def __init__(self, names: dict, compute: dict[str, bool], store: dict, prefix: tuple, report: dict):
        self.names, self.compute, self.store, self.prefix, self.report = names, compute, store, prefix, report

    def run(self, module, compute_output):
        block, kind = self.names[id(module)]
        key = ("pab", *self.prefix, block, kind)
        if self.compute[kind] or key not in self.store:
            self.store[key] = out = compute_output()
            self.report["attention_computed"] = self.report.get("attention_computed", 0) + 1
            return out
        self.report["attention_reused"] = self.report.get("attention_reused", 0) + 1
        return self.store[key]


def decisions(spec: PAB, step: int, num_steps: int) -> dict[str, bool]:
    """Which attention kinds compute at ``step`` of ``num_steps``."""
    low, high = math.ceil(START * num_steps), math.floor(END * num_steps)
    if not low <= step < high:
        return {"self": True, "cross": True}
    return {"self": (step - low) % spec.self_every == 0, "cross": (step - low) % spec.cross_every == 0}


@contextlib.contextmanager
def broadcasting(model, spec: PAB, rows, owner):
    """The plan for one forward of ``owner``'s rows (``rows``) through ``model``."""
    plan = ReusePlan(make_reusable(model), decisions(spec, owner.step, owner.num_steps), owner.values,
                     (rows.expert, rows.branches), owner.report)
    token = _PLAN.set(plan)
    try:
        yield plan
    finally:
        _PLAN.reset(token)
