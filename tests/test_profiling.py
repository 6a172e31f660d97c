"""Profiling: any unit of the task API, or a whole CLI run, under torch.profiler gives a trace
that Perfetto / chrome://tracing open (Chrome trace JSON with the stages as ranges) and each
stage's top operators."""

from __future__ import annotations

import json

from vidloom import VideoGenerator
from vidloom.cli import main as cli_main
from vidloom.profiling import STAGE_PREFIX, profiling


def test_the_task_api_profiles_the_units_it_runs(tiny_wan_dir, tmp_path):
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32")
    task = gen.submit("a cat", height=32, width=32, num_frames=5, num_inference_steps=2)
    gen.step(task)  # text encoding, outside the profile
    with profiling(tmp_path / "prof") as prof:
        while task.batch.step_index < 1:  # the units up to the first denoising step
            gen.step(task)
    trace = json.loads(prof.trace.read_text())
    ranges = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith(STAGE_PREFIX)}
    assert f"{STAGE_PREFIX}denoising" in ranges and f"{STAGE_PREFIX}text_encoding" not in ranges
    assert "denoising" in prof.stages and "text_encoding" not in prof.stages
    assert any(op.startswith("aten::") and ms > 0 for op, ms in prof.stages["denoising"].items())
    summary = prof.summary(top=3)
    assert "denoising:" in summary and str(prof.trace) in summary


def test_the_cli_writes_a_trace_and_prints_the_top_operators_per_stage(tiny_wan_dir, tmp_path, capsys):
    assert cli_main(["generate", "--model", str(tiny_wan_dir), "--prompt", "a cat", "--height", "32", "--width", "32",
                     "--num-frames", "5", "--steps", "2", "--dtype", "fp32", "--quiet",
                     "--output", str(tmp_path / "v.npy"), "--profile", str(tmp_path / "prof")]) == 0
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "prof" / "trace.json").read_text())["traceEvents"]
    for stage in ("text_encoding", "denoising", "decoding", "export"):
        assert f"  {stage}: " in out, out
