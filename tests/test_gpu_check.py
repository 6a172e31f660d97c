"""What a GPU machine meets first: the device default (``auto``) and benchmarks/gpu_check.sh
where there is no CUDA device. Both run on the CPU; the GPU side of the script is exercised only
on a GPU machine."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vidloom.cli import main
from vidloom.config import EngineConfig

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


# ------------------------------------------------------------------------------------ --device auto


def test_device_defaults_to_auto_which_is_the_cpu_without_cuda(monkeypatch):
    no_cuda(monkeypatch)
    assert {f.name: f.default for f in dataclasses.fields(EngineConfig)}["device"] == "auto"
    config = EngineConfig()
    assert config.device == "cpu" and config.torch_device == torch.device("cpu")
    assert EngineConfig(device="AUTO").device == "cpu"
    dtypes = EngineConfig(device="cpu").resolved_dtypes()
    assert config.resolved_dtypes() == dtypes  # the CPU's dtype defaults, as an explicit cpu
    assert dtypes["vae"] == torch.float32


def test_auto_picks_cuda_where_torch_sees_it_with_the_cuda_dtypes(monkeypatch):
    fake_cuda(monkeypatch)
    config = EngineConfig()
    assert config.device == "cuda" and config.torch_device.type == "cuda"
    dtypes = config.resolved_dtypes()
    assert dtypes["transformer"] == dtypes["text_encoder"] == torch.bfloat16  # bf16 DiT on a bf16 GPU
    assert dtypes["vae"] == torch.float32


def test_explicit_cuda_without_cuda_is_a_clear_error(monkeypatch):
    no_cuda(monkeypatch)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=r"^device: 'cuda(:0)?' asked for, but torch sees no CUDA device .*auto"):
            EngineConfig(device=device)
    assert EngineConfig(device="cpu").device == "cpu"  # an explicit cpu is kept


def test_cli_device_cuda_without_cuda_is_one_line_before_loading(tiny_wan_dir, tmp_path, monkeypatch, capsys):
    import vidloom.generator as generator

    no_cuda(monkeypatch)
    monkeypatch.setattr(generator.VideoGenerator, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("the model was loaded")))
    argv = ["generate", "--model", str(tiny_wan_dir), "--prompt", "a cat", "--output", str(tmp_path / "x.npy"),
            "--height", "32", "--width", "48", "--num-frames", "5", "--steps", "1", "--quiet"]
    assert main([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: device: 'cuda' asked for, but torch sees no CUDA")
    assert not (tmp_path / "x.npy").exists()


def test_cli_without_device_runs_on_the_cpu(tiny_wan_dir, tmp_path, monkeypatch, capsys):
    import vidloom.generator as generator

    no_cuda(monkeypatch)
    seen = {}
    real = generator.VideoGenerator.from_pretrained.__func__

    def spy(cls, path, config=None, **options):
        seen["device"] = config.device
        return real(cls, path, config, **options)

    monkeypatch.setattr(generator.VideoGenerator, "from_pretrained", classmethod(spy))
    out = tmp_path / "x.npy"
    assert main(["generate", "--model", str(tiny_wan_dir), "--prompt", "a cat", "--output", str(out), "--height",
                 "32", "--width", "48", "--num-frames", "5", "--steps", "1", "--dtype", "fp32", "--quiet"]) == 0
    assert seen["device"] == "cpu" and out.is_file()


def test_cli_help_names_auto():
    from vidloom.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    assert "--device DEVICE" in text and "auto (default" in " ".join(text.split())


# ------------------------------------------------------------------------------------ gpu_check.sh


def run_check(tmp_path, extra_env=None, timeout=300):
    """benchmarks/gpu_check.sh from a copy-free checkout, with an empty wheel folder and OUT in tmp."""
    wheels = tmp_path / "whl"
    wheels.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIDLOOM_")}
    env.update(OUT=str(tmp_path / "out"), VIDLOOM_GPU_WHEELS=str(wheels), PYTHON=sys.executable,
               CUDA_VISIBLE_DEVICES="")
    env.update(extra_env or {})
    return subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    proc = run_check(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stdout
    report = tmp_path / "out" / "gpu-report.md"
    assert report.is_file()
    text = report.read_text()
    assert "no CUDA device" in text
    assert f"torch {torch.__version__}" in text  # the environment report ran before the CUDA check
    assert "pytest -m cuda" in text and "skipped" in text  # the GPU parts are named as not run
    assert "\n## environment\n" in text and "| environment | exit 0 |" in text  # a section and a summary row
    env = (tmp_path / "out" / "env.json").read_text()
    assert '"cuda_available": false' in env


def test_gpu_check_reports_a_failing_part_and_goes_on(tmp_path):
    # a python that cannot import torch: the environment part fails, the script still writes the
    # report, names the failure with its exit status and exits 0 (no CUDA device either)
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nif [ \"$1\" = -c ] || [ \"$1\" = - ]; then echo 'ImportError: no torch' >&2; "
                    f"exit 3; fi\nexec {sys.executable} \"$@\"\n")
    fake.chmod(0o755)
    proc = run_check(tmp_path, dict(PYTHON=str(fake)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (tmp_path / "out" / "gpu-report.md").read_text()
    assert "environment: exit 3" in text
    assert "no CUDA device" in text


def test_gpu_check_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", "-S", "warning", str(SCRIPT)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


def test_gpu_check_runs_every_cuda_marked_test():
    """The script names the files it collects (tests/ as a whole would import what the carried
    wheels lack); every test that ``pytest -m cuda`` finds under tests/ lies in one of them."""
    import re
    import shlex

    named = shlex.split(re.search(r'^CUDA_TESTS="([^"]*)"$', SCRIPT.read_text(), re.M).group(1))
    assert "tests/cuda" in named and all((REPO / path).exists() for path in named)
    env = {**os.environ, "VIDLOOM_CUDA_TESTS_ON_CPU": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q",
                           "--collect-only", "-m", "cuda", "tests"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = {line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line}
    assert files and "tests/cuda/test_parallel_cuda.py" in files
    outside = sorted(f for f in files if not any(f == p or f.startswith(p.rstrip("/") + "/") for p in named))
    assert outside == [], f"cuda-marked tests that benchmarks/gpu_check.sh does not run: {outside}"
