"""Shared helpers of the benchmark scripts: model folders, timing, peak memory, matmul ceiling.

Benchmarks run vidloom and its reference (diffusers) side by side in one process run and
print ratios: these machines are shared and noisy, so only same-run ratios mean much.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

CACHE = Path(os.environ.get("VIDLOOM_BENCH_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "bench"))

# Wan2.1-T2V-1.3B transformer (diffusers config of Wan-AI/Wan2.1-T2V-1.3B-Diffusers)
WAN_1_3B_TRANSFORMER = dict(
    patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
    pos_embed_seq_len=None,
)
# Wan2.1 VAE (base_dim 96, z_dim 16), the defaults of AutoencoderKLWan
WAN_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
               temperal_downsample=[False, True, True], dropout=0.0)


def machine_description() -> str:
    from vidloom import cpu

    found = cpu.features()
    return (f"{found.model}, {found.describe()}; {os.cpu_count()} logical CPUs; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; python {platform.python_version()}")


def ensure_transformer_folder(name: str, config: dict, dtype=torch.bfloat16, seed: int = 0) -> Path:
    """A random-weight transformer folder in Diffusers layout, written once and reused."""
    from vidloom.loader.weights import save_model
    from vidloom.models.wan_dit import WanDiT, WanDiTConfig

    folder = CACHE / name
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    model = WanDiT(WanDiTConfig.from_dict(config)).to(dtype)
    save_model(model, folder)
    del model
    gc.collect()
    return folder


def is_built(folder: Path) -> bool:
    """Whether ``building(folder, ...)`` finished writing ``folder``."""
    return (folder / "COMPLETE").is_file()


@contextlib.contextmanager
def building(folder: Path, note: str):
    """Write a folder that is built once and reused: the block writes into the yielded (fresh)
    ``<folder>.partial``, which becomes ``folder``, marked COMPLETE with ``note``, only once the
    block has finished, so an interrupted build is never taken for a finished one."""
    import shutil

    start = time.perf_counter()
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    yield partial
    (partial / "COMPLETE").write_text(note + "\n")
    partial.rename(folder)
    gc.collect()
    print(f"wrote {folder} in {time.perf_counter() - start:.1f} s")


def timed(fn, repeats: int = 3, warmup: int = 1, reduce=statistics.median) -> float:
    """Median (or ``reduce``, e.g. ``min``) wall time of ``fn()`` over ``repeats`` runs after
    ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return reduce(times)


def interleaved(fns: dict, repeats: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median times of several functions, run in turn (a, b, a, b, ...) so drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_ceiling(dtype: torch.dtype, n: int = 4096, repeats: int = 5) -> float:
    """Measured FLOP/s of an n x n x n matmul in ``dtype`` (best of ``repeats``)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def guided_request(stage, model, latents: torch.Tensor, text: torch.Tensor, lora=None):
    """One guided request (scale 5) as ``DenoisingStage.predict`` takes it: ``text`` rows [cond;
    uncond], its text keys/values computed now (outside the timed steps) under its LoRA adapters
    (``lora``: ((name, scale), ...) or None)."""
    from vidloom.config import SamplingParams
    from vidloom.lora import adapters_for_rows
    from vidloom.pipelines.batch import ForwardBatch

    batch = ForwardBatch(params=SamplingParams(guidance_scale=5.0, lora=lora), prompt_embeds=text[:1],
                         negative_embeds=text[1:], latents=latents.float())
    with torch.no_grad(), adapters_for_rows(((0, None, lora),) if lora else None):
        stage.context(batch, 0, model)
    return batch


def write_result(name: str, data: dict) -> Path:
    out = CACHE / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def ensure_converted_folder(src: Path, name: str, dtype: torch.dtype) -> Path:
    """A copy of the model folder ``src`` with its floating-point tensors cast to ``dtype``,
    written tensor by tensor (never the whole model in memory) and reused once written."""
    import shutil

    from safetensors import safe_open

    from vidloom.loader.weights import SAFETENSORS_DTYPES as TYPES

    folder = CACHE / name
    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    src_file = src / "diffusion_pytorch_model.safetensors"
    codes = {dt: code for code, dt in TYPES.items()}
    with safe_open(str(src_file), framework="pt") as fh:
        keys = list(fh.keys())
        header, offset = {"__metadata__": fh.metadata() or {}}, 0
        for key in keys:
            info = fh.get_slice(key)
            src_dt = TYPES[info.get_dtype()]
            dt = dtype if src_dt.is_floating_point else src_dt
            nbytes = dt.itemsize
            for n in info.get_shape():
                nbytes *= n
            header[key] = dict(dtype=codes[dt], shape=info.get_shape(), data_offsets=[offset, offset + nbytes])
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        tmp = folder / "diffusion_pytorch_model.safetensors.tmp"
        with open(tmp, "wb") as out:
            out.write(len(raw).to_bytes(8, "little") + raw)
            for key in keys:
                t = fh.get_tensor(key)
                t = t.to(dtype) if t.is_floating_point() else t
                out.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    tmp.rename(folder / "diffusion_pytorch_model.safetensors")
    shutil.copy(src / "config.json", folder / "config.json")
    return folder
