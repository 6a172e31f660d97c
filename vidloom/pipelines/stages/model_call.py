"""The one transformer call of the denoising loop, and the guidance that combines its rows.

Every transformer evaluation (one request's conditional and unconditional rows together or
apart, one CFG branch per process, several requests' rows in one forward) goes through a
``ModelCall``, given the expert's module in use and told whose rows it computes (``Rows``). A policy that changes how the model is run
(a feature cache, CFG gating) wraps ``PlainCall`` and keeps what it remembers per request in
``ForwardBatch.policy_state`` (the ``Rows.owners``), never on the shared module.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from ...models.attention import sequence_parallel
from ..batch import ForwardBatch, PolicyState

if TYPE_CHECKING:  # the stage imports this module
    from .denoising import Expert

COND, UNCOND = "cond", "uncond"


@dataclass(frozen=True)
class Rows:
    """Who each block of a forward's rows is: block k is ``sizes[k]`` consecutive rows of the
    request whose state is ``owners[k]``, on CFG branch ``branches[k]`` ("cond" / "uncond"); all
    of them for the expert whose component is named ``expert`` ("transformer", "transformer_2")."""

    owners: tuple[PolicyState, ...]
    branches: tuple[str, ...]
    sizes: tuple[int, ...]
    expert: str = "transformer"

    @classmethod
    def of(cls, batch: ForwardBatch, branches: tuple[str, ...], expert: str = "transformer") -> "Rows":
        """One request's rows, one block of its batch size per branch."""
        n = len(branches)
        return cls((batch.policy_state,) * n, branches, (batch.latents.shape[0],) * n, expert)

    @classmethod
    def joined(cls, parts: list["Rows"]) -> "Rows":
        """The rows of several requests' forwards (of one expert) stacked in order."""
        return cls(*(sum((getattr(p, name) for p in parts), ()) for name in ("owners", "branches", "sizes")),
                   expert=parts[0].expert)


class ModelCall(Protocol):
    def __call__(self, model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, context_kv: list,
                 rows: Rows) -> torch.Tensor:
        """The prediction of ``model`` (the expert's transformer, where it computes) for ``x``
        (rows as ``rows`` says) at timesteps ``t``."""

    def batch_key(self, batch: ForwardBatch, expert: Expert) -> Hashable | None:
        """What must be equal for two requests' rows to share a forward (None: never shared)."""

    def exchanged(self, prediction: dict[str, torch.Tensor], rows: Rows) -> dict[str, torch.Tensor]:
        """Under CFG parallelism, after the exchange: both branches' predictions (``rows``: this
        process's branch) as the call completes them, the same on both processes."""


class PlainCall:
    """The transformer's own forward, under the sequence-parallel exchange when one is given."""

    def __init__(self, sequence=None):
        self.sequence = sequence

    def __call__(self, model, x, t, context_kv, rows):
        with sequence_parallel(self.sequence):
            return model(x, t, context_kv=context_kv)

    def batch_key(self, batch, expert):
        return ()  # any rows may share a forward

    def exchanged(self, prediction, rows):
        return prediction


def split_rows(out: torch.Tensor, rows: Rows) -> list[torch.Tensor]:
    """A forward's output (sum(sizes), ...) -> one tensor per row block (sizes[k], ...)."""
    return list(out.split(list(rows.sizes)))


def guided(prediction: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """Classifier-free guidance of one request's branch predictions: the unconditional prediction
    moved ``scale`` times towards the conditional one; without guidance, the conditional one."""
    if UNCOND not in prediction:
        return prediction[COND]
    cond, uncond = prediction[COND], prediction[UNCOND]
    return uncond + scale * (cond - uncond)
