"""Where components live while stages use them: residency policies (``residency.py``: the
protocol, component handles, every component resident; ``expert_offload.py``: the idle expert of
a two-expert model kept in CPU memory; ``levels.py``: the memory levels) and
``residency_for(config)``, which picks one."""

from __future__ import annotations

from .residency import Handle, Residency, handle_of, residency_for

__all__ = ["Handle", "Residency", "handle_of", "residency_for"]
