"""Multi-process generation on gloo (CPU): sequence parallel, CFG parallel and both give the
single-process video; wrong layouts are errors before loading; a failing rank ends the run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vidloom import EngineConfig, VideoGenerator
from vidloom.cli import main as cli_main
from vidloom.parallel import check_layout

from ..numerics import rel_err

WORKER = Path(__file__).with_name("worker.py")
LAUNCH_TIMEOUT_S = 240  # a hang would end here, far beyond a normal run's ~15 s


def launch(nproc: int, model_dir: Path, request: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    request_path = tmp_path / "request.json"
    request_path.write_text(json.dumps(request))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(WORKER), str(model_dir), str(request_path), str(tmp_path / "out.npy")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


def assert_two_processes_equal_one(folder, request: dict, latents, engine: dict, tmp_path) -> None:
    """``request`` with the initial noise ``latents`` on two gloo processes with ``engine`` (SP or
    CFG parallel really taken on both ranks) gives the one-process video (fp32, <= 1e-5)."""
    torch.save(latents, tmp_path / "latents.pt")
    single = VideoGenerator.from_pretrained(folder, dtype="fp32").generate(latents=latents, **request).frames
    proc = launch(2, folder, dict(request, engine=engine, latents_path=str(tmp_path / "latents.pt")), tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    kind = "sequence=UlyssesSequenceParallel" if engine.get("sp_size", 1) > 1 else "cfg=CFGParallel"
    assert proc.stdout.count(kind) == 2, proc.stdout
    assert rel_err(np.load(tmp_path / "out.npy"), single) <= 1e-5  # fp32


# 48x48 pixels, 9 frames: a 3x3x3 token grid (27 tokens, odd: padded for 2 ranks); 48x64: 36 tokens
@pytest.mark.parametrize("engine,nproc,size", [
    ({"sp_size": 2}, 2, (48, 48)),
    ({"sp_size": 2}, 2, (48, 64)),
    ({"cfg_parallel": True}, 2, (48, 48)),
    ({"sp_size": 2, "cfg_parallel": True}, 4, (48, 48)),
], ids=["sp2-uneven", "sp2-even", "cfg2", "sp2xcfg2-uneven"])
def test_parallel_generation_equals_one_process(tiny_wan_dir, tmp_path, engine, nproc, size):
    height, width = size
    request = dict(prompt="a red circle moving left", height=height, width=width, num_frames=9,
                   num_inference_steps=3, guidance_scale=4.0)
    latents = torch.randn(1, 4, 3, height // 8, width // 8, generator=torch.Generator().manual_seed(0))
    torch.save(latents, tmp_path / "latents.pt")
    single = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32").generate(latents=latents, **request).frames
    proc = launch(nproc, tiny_wan_dir, dict(request, engine=engine, latents_path=str(tmp_path / "latents.pt")),
                  tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # every rank really ran the parallel path
    for kind in (["sequence=UlyssesSequenceParallel"] if engine.get("sp_size", 1) > 1 else []) + \
            (["cfg=CFGParallel"] if engine.get("cfg_parallel") else []):
        assert proc.stdout.count(kind) == nproc, proc.stdout
    parallel = np.load(tmp_path / "out.npy")
    assert parallel.shape == single.shape
    assert rel_err(parallel, single) <= 1e-5  # fp32


def test_parallel_vae_decode_equals_the_one_process_tiled_decode(tiny_wan_dir, tmp_path):
    z = torch.randn(1, 4, 3, 12, 16, generator=torch.Generator().manual_seed(2))  # 4 x 6 tiles of 4 latent pixels, overlap 1
    torch.save(z, tmp_path / "z.pt")
    gen = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32")
    vae = gen.pipeline.components["vae"]
    with torch.inference_mode():  # the decoding stage's path, as in the ranks
        single = vae.decode_tiled(z, tile_latent=4, overlap_latent=1).numpy()
    proc = launch(2, tiny_wan_dir, dict(mode="vae-decode", engine={"sp_size": 2}, latents_path=str(tmp_path / "z.pt"),
                                        tile=4, overlap=1), tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    parallel = np.load(tmp_path / "out.npy")
    assert parallel.shape == single.shape == (1, 3, 9, 96, 128)
    assert rel_err(parallel, single) <= 1e-6  # the same tiles, decoded in other processes


def test_cli_nproc_starts_the_processes_itself_and_rank_0_writes(tiny_wan_dir, tmp_path):
    common = ["generate", "--model", str(tiny_wan_dir), "--prompt", "a cat", "--height", "48", "--width", "48",
              "--num-frames", "9", "--steps", "2", "--seed", "3", "--dtype", "fp32", "--quiet"]
    assert cli_main(common + ["--output", str(tmp_path / "one.npy")]) == 0
    proc = subprocess.run([sys.executable, "-m", "vidloom", *common, "--output", str(tmp_path / "two.npy"),
                           "--nproc", "2", "--sp-size", "2"], capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("wrote ") == 1  # one report, from rank 0
    assert rel_err(np.load(tmp_path / "two.npy"), np.load(tmp_path / "one.npy")) <= 1e-5


@pytest.mark.parametrize("fail", [{"fail_on_rank": 1}, {"fail_on_rank": 1, "fail_at_step": 1}],
                         ids=["before-loading", "mid-denoising"])
def test_a_failing_rank_ends_the_run_with_its_error(tiny_wan_dir, tmp_path, fail):
    latents = torch.randn(1, 4, 3, 6, 6)
    torch.save(latents, tmp_path / "latents.pt")
    request = dict(prompt="a cat", height=48, width=48, num_frames=9, num_inference_steps=3, guidance_scale=4.0,
                   engine={"sp_size": 2}, latents_path=str(tmp_path / "latents.pt"), **fail)
    proc = launch(2, tiny_wan_dir, request, tmp_path)  # returns (does not hang) ...
    assert proc.returncode != 0  # ... with a failure ...
    assert "planted failure on rank 1" in proc.stdout + proc.stderr  # ... that names the error
    assert not (tmp_path / "out.npy").exists()


def test_layout_errors_name_the_options():
    check_layout(2, True, 4, num_heads=12)
    with pytest.raises(ValueError, match=r"sp_size=2 x cfg degree 2 .* needs 4 processes, but the world size is 3"):
        check_layout(2, True, 3)
    with pytest.raises(ValueError, match=r"sp_size=5 with ring_size=1 splits the transformer's 12 attention heads "
                                         r"over 5 Ulysses ranks, which must divide them \(allowed ring_size for "
                                         r"sp_size=5: 5; ring attention works for any head count\)"):
        check_layout(5, False, 5, num_heads=12)
    with pytest.raises(ValueError, match="sp_size"):
        EngineConfig(sp_size=0)
    with pytest.raises(ValueError, match="cfg_parallel"):
        EngineConfig(cfg_parallel="yes")


EXIT_PROBE = """
import atexit, os, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PROBE_PORT"], RANK="0", WORLD_SIZE="1")
# registered first, so it runs last: after whatever the engine registered at exit
atexit.register(lambda: print("at exit, initialized:", dist.is_initialized(), flush=True))
from vidloom.parallel.state import ParallelState
state = ParallelState.initialize(1, False, torch.device("cpu"))
print("initialized:", dist.is_initialized(), flush=True)
"""


def test_the_process_groups_an_engine_starts_are_destroyed_before_exit():
    """Left to the interpreter's teardown, gloo's threads can abort a rank that finished its work."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-c", EXIT_PROBE], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PROBE_PORT": str(port)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:2] == ["initialized: True", "at exit, initialized: False"], proc.stdout


def test_wrong_layout_is_an_error_before_any_weight_is_read(tiny_wan_dir, monkeypatch):
    import vidloom.generator as generator

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(generator, "load_components", no_loading)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="needs 2 processes, but the world size is 1"):
        VideoGenerator.from_pretrained(tiny_wan_dir, sp_size=2)


def test_cli_reports_a_wrong_layout_as_one_error_line(tiny_wan_dir, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli_main(["generate", "--model", str(tiny_wan_dir), "--prompt", "a cat", "--cfg-parallel",
                     "--height", "48", "--width", "48", "--num-frames", "9"]) == 2
    assert "error: sp_size=1 x cfg degree 2 (cfg_parallel=True) needs 2 processes" in capsys.readouterr().err


def test_image_to_video_with_sp2_equals_one_process(tiny_wan_pipe, tmp_path):
    """I2V (image tokens and condition channels) sharded over two ranks: the one-process video."""
    from PIL import Image

    from ..parity.test_i2v_parity import build_i2v_folder

    folder = build_i2v_folder(tiny_wan_pipe, tmp_path / "i2v")
    image = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8), "RGB").save(image)
    request = dict(prompt="a red circle moving left", height=48, width=48, num_frames=9, num_inference_steps=3,
                   guidance_scale=4.0, image=str(image))  # 27 tokens: uneven over 2 ranks
    latents = torch.randn(1, 4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    assert_two_processes_equal_one(folder, request, latents, {"sp_size": 2}, tmp_path)


@pytest.mark.parametrize("with_image,engine", [(True, {"sp_size": 2}), (False, {"sp_size": 2}),
                                               (True, {"cfg_parallel": True})], ids=["ti2v-sp2", "t2v-sp2", "ti2v-cfg2"])
def test_ti2v_with_two_processes_equals_one_process(tiny_wan_pipe, tmp_path, with_image, engine):
    """Wan2.2 TI2V's per-token timesteps (the first frame's tokens at 0) cut with the tokens over
    two ranks, its text-to-video, and TI2V with the guidance branches on two ranks: the
    one-process video."""
    from PIL import Image

    from ..parity.test_ti2v_parity import build_ti2v_folder, initial_latents

    folder = build_ti2v_folder(tiny_wan_pipe, tmp_path / "ti2v")
    request = dict(prompt="a red circle moving left", height=64, width=96, num_frames=9, num_inference_steps=3,
                   guidance_scale=4.0)  # 3 x 2 x 3 = 18 tokens: the first frame's 6 on rank 0 only
    if with_image:
        image = tmp_path / "first.png"
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8), "RGB").save(image)
        request["image"] = str(image)
    latents = initial_latents()
    assert_two_processes_equal_one(folder, request, latents, engine, tmp_path)


def test_two_experts_with_sp2_equals_one_process(tiny_wan_dir, tiny_wan_pipe, tmp_path):
    """Wan2.2 A14B's two experts (each with its own text keys/values) over two ranks."""
    from diffusers import WanPipeline, WanTransformer3DModel

    from vidloom import tiny

    folder = tmp_path / "two_expert"
    torch.manual_seed(1)
    parts = {k: getattr(tiny_wan_pipe, k) for k in ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")}
    WanPipeline(**parts, transformer_2=WanTransformer3DModel(**tiny.TINY_TRANSFORMER),
                boundary_ratio=0.5).save_pretrained(str(folder))
    request = dict(prompt="a red circle moving left", height=48, width=48, num_frames=9, num_inference_steps=4,
                   guidance_scale=4.0, guidance_scale_2=2.0)
    latents = torch.randn(1, 4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    assert_two_processes_equal_one(folder, request, latents, {"sp_size": 2}, tmp_path)


def test_two_stage_with_sp2_equals_one_process(tiny_wan_dir, tmp_path):
    """Two-stage generation over two ranks: the base pass (27 tokens, uneven) and the refine pass
    (108 tokens) both sharded."""
    request = dict(prompt="a red circle moving left", height=96, width=96, num_frames=9, num_inference_steps=3,
                   guidance_scale=4.0, refine={"scale": 2, "strength": 0.5, "steps": 2})
    latents = torch.randn(1, 4, 3, 6, 6, generator=torch.Generator().manual_seed(0))  # the base pass's noise
    assert_two_processes_equal_one(tiny_wan_dir, request, latents, {"sp_size": 2}, tmp_path)


@pytest.mark.parametrize("engine", [{"sp_size": 2}, {"cfg_parallel": True}], ids=["sp2", "cfg2"])
def test_a_feature_cache_on_two_processes_equals_one_process(tiny_wan_dir, tmp_path, engine):
    """SP: the block cache's skip decisions are measured over the whole (padded, sharded)
    sequence. CFG parallel: each process keeps its branch's block cache; once the gate opens the
    unconditional process computes nothing and both complete its prediction from the exchanged
    conditional one. Either way two processes skip the same steps as one, give its video and
    report the same counts (summed over both branches' processes)."""
    request = dict(prompt="a red circle moving left", height=48, width=48, num_frames=9, num_inference_steps=6,
                   guidance_scale=4.0, cache="block:F1B0:0.3+cfg-gate:0.6")
    latents = torch.randn(1, 4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    one = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32").generate(latents=latents, **request)
    assert one.cache["blocks_skipped"] > 0 and one.cache["uncond_skipped"] > 0  # the cache really skipped
    assert_two_processes_equal_one(tiny_wan_dir, request, latents, engine, tmp_path)
    two = json.loads((tmp_path / "out.npy.cache.json").read_text())
    assert two.keys() == one.cache.keys()
    for name, value in one.cache.items():
        assert two[name] == pytest.approx(value, rel=1e-4), name


@pytest.mark.parametrize("engine", [{"sp_size": 2}, {"cfg_parallel": True}], ids=["sp2", "cfg2"])
def test_quantized_weights_on_two_processes_equal_one_process(tiny_wan_dir, tmp_path, engine):
    """int8 blocks under sequence or CFG parallel: each rank quantizes the same weights the same
    way, so the video is the one-process quantized video (fp32, <= 1e-5); tensor parallel is refused."""
    request = dict(prompt="a red circle moving left", height=48, width=48, num_frames=9, num_inference_steps=3,
                   guidance_scale=4.0)
    latents = torch.randn(1, 4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    torch.save(latents, tmp_path / "latents.pt")
    single = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32", quantize="int8").generate(
        latents=latents, **request).frames
    plain = VideoGenerator.from_pretrained(tiny_wan_dir, dtype="fp32").generate(latents=latents, **request).frames
    assert rel_err(single, plain) > 1e-5  # the weights really are quantized
    proc = launch(2, tiny_wan_dir, dict(request, engine=dict(engine, quantize="int8"),
                                        latents_path=str(tmp_path / "latents.pt")), tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert rel_err(np.load(tmp_path / "out.npy"), single) <= 1e-5
    with pytest.raises(ValueError, match="quantize: does not combine with tensor parallel yet"):
        EngineConfig(quantize="int8", tp_size=2)
