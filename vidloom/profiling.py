"""Profiling a request, or any of its units, with ``torch.profiler``.

Every unit of work runs inside a ``record_function`` range named ``STAGE_PREFIX + stage name``
(see ``VideoGenerator._run``): a trace opened in Perfetto or chrome://tracing shows the stages,
and ``top_operators`` attributes each operator's own time to the stage it ran in. The ranges cost
nothing measurable when no profiler is active.

    with profiling("trace-dir") as prof:    # the task API: profile whatever runs inside
        gen.step(task)
    print(prof.summary())
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import defaultdict
from pathlib import Path

import torch

STAGE_PREFIX = "vidloom:"
TRACE_NAME = "trace.json"


def stage_range(name: str):
    """The profiler range one unit of stage ``name`` runs in."""
    return torch.profiler.record_function(STAGE_PREFIX + name)


@dataclasses.dataclass
class Profile:
    """What ``profiling`` recorded: the trace file, and per stage its operators' own time (ms)."""

    trace: Path
    stages: dict[str, dict[str, float]]

    def summary(self, top: int = 8) -> str:
        lines = [f"profile: {self.trace} (open in https://ui.perfetto.dev or chrome://tracing)"]
        for stage, ops in self.stages.items():
            total = sum(ops.values())
            lines.append(f"  {stage}: {total:.1f} ms in operators")
            for name, ms in sorted(ops.items(), key=lambda kv: -kv[1])[:top]:
                lines.append(f"    {ms:9.2f} ms  {100 * ms / total if total else 0:5.1f} %  {name}")
        return "\n".join(lines)


@contextlib.contextmanager
def profiling(directory: str | Path, cuda: bool | None = None):
    """Profile the block: on exit the Chrome trace is written to ``directory/trace.json`` and the
    yielded ``Profile`` filled in. ``cuda``: record CUDA kernels too (default: when CUDA is present)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda if cuda is not None else torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    result = Profile(directory / TRACE_NAME, {})
    with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
        yield result
    prof.export_chrome_trace(str(result.trace))
    result.stages = top_operators(prof.events())


def top_operators(events) -> dict[str, dict[str, float]]:
    """Stage -> operator name -> self time in ms (CPU, plus the device time of its kernels), each
    operator charged to the innermost stage range it ran in ("other": outside any)."""
    stages: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for event in events:
        if event.name.startswith(STAGE_PREFIX):
            continue
        parent, stage = event.cpu_parent, "other"
        while parent is not None:
            if parent.name.startswith(STAGE_PREFIX):
                stage = parent.name[len(STAGE_PREFIX):]
                break
            parent = parent.cpu_parent
        own = event.self_cpu_time_total + getattr(event, "self_device_time_total", 0)
        if own > 0:
            stages[stage][event.name] += own / 1000.0
    return {stage: dict(ops) for stage, ops in stages.items()}
