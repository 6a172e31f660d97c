"""``offload_experts``: of a two-expert model (Wan2.2 A14B), only the expert serving the current
step is on the compute device; the other waits in CPU memory. The low-noise expert is loaded
into CPU memory, and a use of one expert moves it onto the device and its partner off it: one
move each way per expert switch, and Wan2.2's experts switch once per request."""

from __future__ import annotations

import torch

from .levels import ONE_COMPONENT, LevelResidency, level_now

CPU = torch.device("cpu")
# the experts that take turns on the device: a folder's, and a refine folder's
EXPERT_PAIRS = (("transformer", "transformer_2"), ("refine.transformer", "refine.transformer_2"))


class ExpertOffload(LevelResidency):
    def load_device(self, name: str) -> torch.device:
        return CPU if name.endswith("transformer_2") else self.device

    def acquire(self, name: str) -> torch.nn.Module:
        if level_now(self.level) >= ONE_COMPONENT:  # a unit run again higher: one component at a time
            return super().acquire(name)
        module = self.loaded(name)
        for pair in EXPERT_PAIRS:
            if name in pair:
                for other in pair:
                    if other in self._components:
                        self._place(self._components[other], self.device if other == name else CPU)
        return module

    def _place(self, module: torch.nn.Module, target: torch.device) -> None:
        # where it is now, read each time: the refine pass may share the experts
        if self.device_of(module) != target:
            module.to(target)
