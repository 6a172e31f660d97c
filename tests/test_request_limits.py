"""Requests are bounded by what the model can take, checked before any heavy work: sizes by the
DiT's largest token grid, steps by the scheduler, text length by the tokenizer; and every field of
a request is checked for its type and range at submit."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from vidloom import EngineConfig, InvalidRequestError, SamplingParams, VideoGenerator
from vidloom.config import RequestLimits

SMALL = dict(height=32, width=48, num_frames=5, num_inference_steps=2)

# Runs CLI requests in one process under a 3 GB address-space limit (the shipped model generates a
# whole video in ~1.2 GB of address space; its VAE is 4x spatial, so sizes are multiples of 8): each must end in a one-line error, none in an
# allocation failure. Without the bounds, these requests allocated 4-8 GB or tried 2.7 TB.
_UNDER_LIMIT = """
import contextlib, io, json, resource, sys
limit = 3 * 2**30
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from vidloom.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(["generate", "--quiet", "--prompt", "a red circle moving right", *argv])
        except BaseException as exc:  # a MemoryError or a traceback is what must not happen
            rc = f"{type(exc).__name__}: {exc}"[:300]
    results.append([rc, err.getvalue()])
print(json.dumps(results))
"""


def test_huge_requests_are_one_line_errors_before_any_large_allocation(tmp_path):
    out = str(tmp_path / "x.npy")
    cases = [
        (["--height", "8192", "--width", "8192"], "height: got 8192 (allowed: multiples of 8 up to 512)"),
        (["--height", str(2**31)], "height: got 2147483648"),
        (["--num-frames", "1000001"], "num_frames: got 1000001 (allowed: 4k+1 frames up to 253"),
        (["--num-frames", "100001"], "num_frames: got 100001"),
        (["--width", "100000"], "width: got 100000"),
        (["--steps", "1000000000"], "num_inference_steps: got 1000000000 (allowed: integers 1..1000"),
        (["--max-sequence-length", "100000"], "max_sequence_length: got 100000 (allowed: integers 1..512"),
    ]
    argvs = [argv + ["--output", out] for argv, _ in cases]
    proc = subprocess.run([sys.executable, "-c", _UNDER_LIMIT, json.dumps(argvs)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for (argv, needle), (rc, err) in zip(cases, results):
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(errors) == 1 and needle in errors[0], (argv, rc, err)


def test_limits_come_from_the_folder_without_loading(tiny_wan_dir, monkeypatch):
    import vidloom.generator as generator

    monkeypatch.setattr(generator, "load_components", lambda *a, **k: pytest.fail("weights were loaded"))
    limits = VideoGenerator.request_limits(tiny_wan_dir)
    # tiny model: VAE 8x / 4x, patch (1, 2, 2), rope_max_seq_len 64, UniPC 1000 steps, 512 tokens
    assert limits == RequestLimits(vae_spatial_factor=8, temporal_factor=4, patch=(1, 2, 2), max_grid_side=64,
                                   max_tokens=EngineConfig().max_tokens, max_steps=1000, max_sequence_length=512,
                                   transformer_blocks=2)
    assert (limits.max_size(1), limits.max_size(2), limits.max_size(0)) == (1024, 1024, 253)
    assert VideoGenerator.request_limits(tiny_wan_dir, EngineConfig(max_tokens=10)).max_tokens == 10


def test_largest_allowed_size_is_accepted_and_one_more_is_not():
    limits = RequestLimits(max_grid_side=64)
    SamplingParams(height=1024, width=1024, num_frames=253, max_sequence_length=512).validate(limits)
    for field, value in (("height", 1040), ("width", 1040), ("num_frames", 257)):
        with pytest.raises(InvalidRequestError) as err:
            SamplingParams(**{field: value}).validate(limits)
        assert err.value.field == field


def test_token_budget_names_the_size():
    limits = RequestLimits(max_tokens=100)
    SamplingParams(height=80, width=80, num_frames=1).validate(limits)  # 5 x 5 tokens
    with pytest.raises(InvalidRequestError, match=r"is 252 tokens \(allowed: at most 100 tokens"):
        SamplingParams(height=48, width=64, num_frames=81).validate(limits)  # 21 x 3 x 4 tokens
    with pytest.raises(ValueError, match="max_tokens"):
        EngineConfig(max_tokens=0)


@pytest.mark.parametrize("field,value,allowed", [
    ("guidance_scale", math.inf, "numbers 0..1000"),
    ("guidance_scale", 1e308, "numbers 0..1000"),
    ("guidance_scale", math.nan, "numbers 0..1000"),
    ("flow_shift", math.inf, "numbers 0.001..1000"),
    ("flow_shift", 1e-300, "numbers 0.001..1000"),
    ("seed", 2**64, "integers -2**63 .. 2**64-1"),
    ("seed", -(2**63) - 1, "integers -2**63 .. 2**64-1"),
    ("return_trajectory", "no", "True or False"),
    ("decode_trajectory", 1, "True or False"),
    ("num_inference_steps", 1001, "integers 1..1000"),
])
def test_out_of_range_values_name_the_field(field, value, allowed):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**{field: value}).validate()
    assert err.value.field == field and allowed in str(err.value)


def test_seed_range_ends_are_accepted():
    for seed in (-(2**63), 2**64 - 1):
        SamplingParams(seed=seed).validate()
        torch.Generator().manual_seed(seed)  # what latent preparation does with it


def test_decode_trajectory_needs_return_trajectory():
    with pytest.raises(InvalidRequestError, match="needs return_trajectory=True"):
        SamplingParams(decode_trajectory=True).validate()
    SamplingParams(decode_trajectory=True, return_trajectory=True).validate()


@pytest.mark.parametrize("latents,needle", [
    (torch.zeros(1, 4, 2, 4, 6, dtype=torch.int64), "not a real floating-point type"),
    (torch.zeros(1, 4, 2, 4, 6, dtype=torch.bool), "not a real floating-point type"),
    (torch.zeros(1, 4, 2, 4, 6, dtype=torch.complex64), "not a real floating-point type"),
    (torch.zeros(1, 4, 2, 4, 6, device="meta"), "meta device"),
    (torch.full((1, 4, 2, 4, 6), math.nan), "NaN or Inf"),
])
def test_bad_latents_fail_at_submit_before_any_work(tiny_generator, latents, needle, monkeypatch):
    # submit alone: no unit of work (text encoding first) has run
    with pytest.raises(InvalidRequestError, match=needle) as err:
        tiny_generator.submit("a cat", latents=latents, **SMALL)
    assert err.value.field == "latents"


def test_a_good_request_after_the_bad_ones_is_unchanged(tiny_generator):
    first = tiny_generator.generate("a cat", seed=1, **SMALL).frames
    for bad in (dict(seed=2**64), dict(guidance_scale=math.inf), dict(height=4096)):
        with pytest.raises(InvalidRequestError):
            tiny_generator.submit("a cat", **{**SMALL, **bad})
    assert (tiny_generator.generate("a cat", seed=1, **SMALL).frames == first).all()


@pytest.mark.parametrize("options,needle", [
    (dict(vae_tile_size="abc"), "vae_tile_size: expected an integer"),
    (dict(vae_tile_overlap=300), "vae_tile_overlap: expected an integer in 0..255"),
    (dict(batch_cfg="no"), "batch_cfg: expected true or false"),
    (dict(check_finite=1), "check_finite: expected true or false"),
    (dict(vae_tiling="yes"), "vae_tiling: expected true or false"),
    (dict(map_weights=None), "map_weights: expected true or false"),
    (dict(device="cuda:0"), "device"),
])
def test_bad_engine_options_are_errors_before_loading(options, needle):
    if "device" in options and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match=needle):
        EngineConfig(**options)


def test_tile_overlap_of_a_whole_latent_tile_is_an_error_at_load(tiny_wan_dir, monkeypatch):
    import vidloom.generator as generator

    monkeypatch.setattr(generator, "load_components", lambda *a, **k: pytest.fail("weights were loaded"))
    # 33 px tiles with 32 px overlap: 4 latent pixels of tile, 4 of overlap at the 8x VAE
    with pytest.raises(ValueError, match=r"vae_tile_overlap: 32 px covers a whole 33 px tile .*less than 32 px"):
        VideoGenerator.from_pretrained(tiny_wan_dir, vae_tiling=True, vae_tile_size=33, vae_tile_overlap=32)


def test_unwritable_output_path_is_an_error_at_submit(tiny_generator):
    for path in ("/proc/x.npy", "/dev/full/x.npy"):
        with pytest.raises(InvalidRequestError) as err:
            tiny_generator.submit("a cat", output_path=path, **SMALL)
        assert err.value.field == "output_path"


def test_numerical_error_hint_names_the_dtype(tiny_generator):
    from vidloom import NumericalError

    with pytest.raises(NumericalError, match=r"step 1: .*runs in float32: check the weights and inputs"):
        tiny_generator.generate("a cat", latents=torch.full((1, 4, 2, 4, 6), 1e38), **SMALL)
