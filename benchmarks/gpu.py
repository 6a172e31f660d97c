"""vidloom vs diffusers 0.42.1 on one GPU, in one process run: the Wan2.1-T2V-1.3B architecture
at its real size (random weights), bf16 DiT and text encoder, fp32 VAE (vidloom's defaults).

    python benchmarks/gpu.py                       # CUDA, 81x480x832, 30 layers, 4 steps
    python benchmarks/gpu.py --device cpu --size 5x64x64 --layers 2 --repeats 1   # smoke test

What it measures, each for vidloom and for diffusers on the same folder, same latents:
  step  one denoising step with classifier-free guidance at timestep index 0: vidloom's
        DenoisingStage.step (the unit the task API runs: DiT prediction for both branches,
        guidance, scheduler step, finiteness check) on a batch prepared by the pipeline's own
        stages; diffusers' transformer called for the conditional and then the unconditional
        embeddings, the guidance and scheduler.step, as WanPipeline.__call__ does. 1 warm-up and
        --repeats timed runs each, interleaved, torch.cuda.synchronize around each, median.
  e2e   a whole generation (text encoding, --steps steps, VAE decode to a numpy video), one
        timed run each (--e2e-repeats), after the step benchmark and a 1-step warm-up generation
        at a small size have loaded the kernels.
  For each: the time ratio vidloom/diffusers, the peak GPU memory of each library and its ratio,
  the relative error between the two outputs. Peak memory = the library's own weights (for the
  step: the transformer's; end to end: transformer, text encoder and VAE) + the most allocated
  above what was allocated when the call began (torch.cuda.max_memory_allocated after
  reset_peak_memory_stats), i.e. what the library would peak at alone; both libraries' models
  stay resident together so the runs can interleave.
  Utilisation: the step's FLOPs counted from the architecture (benchmarks/dit.py step_flops: the
  matmuls of every block, self-attention over all tokens, cross-attention over 512 text tokens
  with their keys/values, the FFN, x2 for CFG; the same count for both libraries) over the step's
  time, divided by the GPU's bf16 matmul rate measured in the same run (8192^3 matmuls, median).

The model folder (Diffusers layout) is written once under --cache (default
/tmp/vidloom-gpu-bench, or $VIDLOOM_GPU_BENCH_CACHE) and reused; on a GPU its random weights are
made on the GPU. The text encoder is NOT the real UMT5-XXL (5.7B parameters): a small random UMT5
(2 layers, 8 heads, d_ff 1024) with the real d_model 4096, so that the DiT's text_dim fits; the
tokenizer is the tests' small one. Text encoding is not what is measured (with UMT5-XXL it would
add about the same time to both libraries). Random weights make the video noise; the numbers are
the engine's speed, memory and agreement with diffusers.

Exit status: 0 when both libraries ran every part, 1 when a part failed (it is reported in its
row and the other parts still run), 2 for bad options or when CUDA is absent without --device cpu.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WAN_1_3B_TRANSFORMER, WAN_VAE, building, is_built, machine_description  # noqa: E402
from dit import step_flops  # noqa: E402

CACHE = Path(os.environ.get("VIDLOOM_GPU_BENCH_CACHE", "/tmp/vidloom-gpu-bench"))
FOLDER_VERSION = "v1"  # bump when the folder's recipe changes
# the real UMT5-XXL's d_model (the DiT's text_dim), heads of the real d_kv, few layers and a narrow FFN
TEXT_ENCODER = dict(d_model=4096, d_kv=64, d_ff=1024, num_layers=2, num_heads=8, relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, dropout_rate=0.0, feed_forward_proj="gated-gelu")
PROMPT = "a red circle moving right across a blue sea at sunset, cinematic"
NEGATIVE = "blurry, static, low quality"
GUIDANCE = 5.0
TEXT_LEN = 512
TARGET_TIME, TARGET_MEMORY = 0.8, 1.0
GIB = 2**30


# ------------------------------------------------------------------------------------ model folder


def ensure_model_folder(layers: int, build_device: torch.device) -> Path:
    """A random-weight Wan2.1-T2V-1.3B folder (``layers`` DiT blocks) in Diffusers layout, written once."""
    from transformers import UMT5Config, UMT5EncoderModel

    from vidloom import tiny
    from vidloom.loader.weights import save_model
    from vidloom.models.wan_dit import WanDiT, WanDiTConfig
    from vidloom.models.wan_vae import WanVAE, WanVAEConfig

    folder = CACHE / f"wan2.1-t2v-1.3b-L{layers}-{FOLDER_VERSION}"
    if is_built(folder):
        return folder
    with building(folder, f"layers={layers} built on {build_device}") as partial:
        tokenizer = tiny.build_tokenizer(partial / "tokenizer")
        torch.manual_seed(0)
        with torch.device(build_device):
            dit = WanDiT(WanDiTConfig.from_dict({**WAN_1_3B_TRANSFORMER, "num_layers": layers}))
        save_model(dit.to(torch.bfloat16), partial / "transformer")  # stored bf16: what both load
        del dit
        with torch.device(build_device):
            vae = WanVAE(WanVAEConfig.from_dict(WAN_VAE))
        save_model(vae, partial / "vae")  # fp32
        del vae
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TEXT_ENCODER))
        with torch.no_grad():  # random UMT5 embeddings are ~0.01; scale them so the prompt matters
            text_encoder.encoder.final_layer_norm.weight.mul_(40.0)
        text_encoder.to(torch.bfloat16).save_pretrained(str(partial / "text_encoder"))
        del text_encoder
        tiny.write_json(partial / "scheduler" / "scheduler_config.json",
                        {**tiny.UNIPC_FLOW_CONFIG, "_diffusers_version": "0.42.1"})
        tiny.write_json(partial / "model_index.json", tiny.WAN_T2V_INDEX)
    if build_device.type == "cuda":
        torch.cuda.empty_cache()
    return folder


# ------------------------------------------------------------------------------------ measuring


class Meter:
    """Times calls (synchronised) and their peak device memory above the memory at the call's start."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def call(self, fn):
        """(result, seconds, peak bytes above the start or None off CUDA)."""
        self.sync()
        base = 0
        if self.cuda:
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        out = fn()
        self.sync()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(self.device) - base if self.cuda else None
        return out, seconds, peak


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """FLOP/s of an n^3 matmul in ``dtype`` on ``device`` (median of ``repeats`` after warm-up)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    meter = Meter(device)
    for _ in range(3):
        torch.mm(a, b)
    times = [meter.call(lambda: torch.mm(a, b))[1] for _ in range(repeats)]
    return 2 * n**3 / statistics.median(times)


def weight_bytes(*modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def rel_err(a, b) -> float:
    a = a.detach().double().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)
    b = b.detach().double().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def run_interleaved(meter: Meter, fns: dict, repeats: int, warmup: int, setup: dict | None = None) -> dict:
    """Run each library's fn in turn (a, b, a, b, ...): ``warmup`` untimed rounds, then ``repeats``
    timed. ``setup[name]()`` (untimed) runs before every call. A library that raises is dropped
    from the later rounds and reported with its error."""
    setup = setup or {}
    res = {k: dict(times=[], peaks=[], out=None, error=None) for k in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            r = res[name]
            if r["error"] is not None:
                continue
            try:
                if name in setup:
                    setup[name]()
                out, seconds, peak = meter.call(fn)
            except Exception as exc:  # reported in the table; the other library goes on
                r["error"] = first_line(exc)
                print(f"  {name} failed: {r['error']}", flush=True)
                traceback.print_exc(limit=6)
                gc.collect()
                if meter.cuda:
                    torch.cuda.empty_cache()
                continue
            r["out"] = out
            if round_ >= warmup:
                r["times"].append(seconds)
                r["peaks"].append(peak)
            del out
    for r in res.values():
        r["seconds"] = statistics.median(r["times"]) if r["times"] else None
        r["peak_extra"] = max(r["peaks"]) if r["peaks"] and r["peaks"][0] is not None else None
    return res


# ------------------------------------------------------------------------------------ the two sides


def vidloom_step_fn(gen, latents, size, steps):
    """vidloom's denoising unit 0 on a batch prepared by the pipeline's own stages."""
    from vidloom.config import SamplingParams
    from vidloom.pipelines.batch import ForwardBatch

    frames, height, width = size
    params = SamplingParams.from_kwargs(PROMPT, negative_prompt=NEGATIVE, height=height, width=width,
                                        num_frames=frames, num_inference_steps=steps, guidance_scale=GUIDANCE,
                                        max_sequence_length=TEXT_LEN, latents=latents, output_type="latent")
    gen.pipeline.validate_request(params)
    stage = gen.pipeline.denoising
    batch = ForwardBatch(params=params)
    with torch.no_grad():
        for s in gen.pipeline.stages:
            if s is stage:
                break
            batch = s(batch)
        batch = stage.begin(batch)  # verify and the per-request text keys/values, as unit 0 does

    def run():
        # a shallow copy per call: step replaces latents and scheduler state, the prepared batch stays
        return stage.step(dataclasses.replace(batch), 0).latents

    return run


def diffusers_step_fn(pipe, latents, steps, device):
    """One step of WanPipeline.__call__'s loop (index 0), on embeddings from its encode_prompt."""
    with torch.no_grad():
        pos, neg = pipe.encode_prompt(PROMPT, NEGATIVE, do_classifier_free_guidance=True, num_videos_per_prompt=1,
                                      max_sequence_length=TEXT_LEN, device=device)
    dtype = pipe.transformer.dtype
    pos, neg = pos.to(dtype), neg.to(dtype)
    lat = latents.to(device, torch.float32)
    model = pipe.transformer

    def reset():
        pipe.scheduler.set_timesteps(steps, device=device)
        pipe.scheduler.set_begin_index(0)

    @torch.no_grad()
    def run():
        t = pipe.scheduler.timesteps[0]
        x, timestep = lat.to(dtype), t.expand(lat.shape[0])
        ctx = dict(step_index=0, sigma=float(pipe.scheduler.sigmas[0]), num_inference_steps=len(pipe.scheduler.timesteps))
        with model.cache_context("cond", **ctx):
            cond = model(hidden_states=x, timestep=timestep, encoder_hidden_states=pos, attention_kwargs=None,
                         return_dict=False)[0]
        with model.cache_context("uncond", **ctx):
            uncond = model(hidden_states=x, timestep=timestep, encoder_hidden_states=neg, attention_kwargs=None,
                           return_dict=False)[0]
        noise_pred = uncond + GUIDANCE * (cond - uncond)
        return pipe.scheduler.step(noise_pred, t, lat, return_dict=False)[0]

    return run, reset


def make_latents(size, seed=0):
    frames, height, width = size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8, generator=g)


def e2e_fns(gen, pipe, size, steps, latents, stage_times: dict):
    frames, height, width = size
    common = dict(negative_prompt=NEGATIVE, height=height, width=width, num_frames=frames,
                  num_inference_steps=steps, guidance_scale=GUIDANCE, max_sequence_length=TEXT_LEN)

    def ours():
        out = gen.generate(PROMPT, latents=latents, output_type="np", **common)
        stage_times.clear()
        stage_times.update(out.timings)
        return out.frames

    def ref():
        return pipe(prompt=PROMPT, latents=latents.clone(), output_type="np", **common).frames[0]

    return {"vidloom": ours, "diffusers": ref}


# ------------------------------------------------------------------------------------ main


def parse_size(text: str) -> tuple[int, int, int]:
    try:
        frames, height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size: expected FRAMESxHEIGHTxWIDTH such as 81x480x832, got {text!r}")
    if frames < 1 or (frames - 1) % 4 or height < 16 or width < 16 or height % 16 or width % 16:
        raise argparse.ArgumentTypeError(f"--size {text}: frames must be 4k+1, height and width multiples of 16")
    return frames, height, width


def describe_machine(device: torch.device) -> str:
    import diffusers

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{torch.cuda.get_device_name(device)} ({props.total_memory / GIB:.0f} GiB, "
                f"{props.multi_processor_count} SMs, sm_{props.major}{props.minor}); torch {torch.__version__}, "
                f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, diffusers {diffusers.__version__}, "
                f"python {platform.python_version()}")
    return f"CPU: {machine_description()}; diffusers {diffusers.__version__}"


def fmt(value, spec: str, width: int) -> str:
    return f"{'-' if value is None else format(value, spec):>{width}}"


def ratio(a, b):
    return None if a is None or b is None or not b else a / b


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a smoke test")
    parser.add_argument("--size", type=parse_size, default="81x480x832", help="FRAMESxHEIGHTxWIDTH (81x480x832)")
    parser.add_argument("--layers", type=int, default=WAN_1_3B_TRANSFORMER["num_layers"],
                        help="DiT blocks (the real 30; fewer for a smoke test)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps of the end-to-end run (4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed step runs per library, after 1 warm-up (3)")
    parser.add_argument("--e2e-repeats", type=int, default=1, help="timed end-to-end runs per library (1)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                        help="DiT and text encoder dtype; auto: bf16 on CUDA, on a CPU bf16 only where it is fast")
    parser.add_argument("--matmul-size", type=int, default=None, help="n of the n^3 matmul rate (8192 on CUDA)")
    args = parser.parse_args(argv)
    if args.layers < 1 or args.steps < 1 or args.repeats < 1 or args.e2e_repeats < 1:
        parser.error("--layers, --steps, --repeats and --e2e-repeats must be >= 1")

    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device")
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: CUDA is not available (torch {torch.__version__}, CUDA build: {torch.version.cuda}); "
              f"this benchmark is for a GPU, pass --device cpu for a smoke test", file=sys.stderr)
        return 2
    if device.type not in ("cuda", "cpu"):
        parser.error("--device: cuda, cuda:N or cpu")
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)

    from vidloom.config import bf16_is_fast

    dtype_name = args.dtype
    if dtype_name == "auto":
        dtype_name = "bf16" if device.type == "cuda" or bf16_is_fast(device) else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    size, steps = args.size, args.steps
    frames, height, width = size
    cfg = {**WAN_1_3B_TRANSFORMER, "num_layers": args.layers}
    lat_shape = (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    tokens = lat_shape[2] * (lat_shape[3] // 2) * (lat_shape[4] // 2)

    print(f"machine: {describe_machine(device)}")
    print(f"model: Wan2.1-T2V-1.3B architecture, {args.layers} DiT blocks, random weights; DiT and text encoder "
          f"{dtype_name}, VAE fp32; text encoder a small UMT5 (2 layers, d_model 4096), not UMT5-XXL")
    print(f"size: {frames}x{height}x{width} (latents {'x'.join(map(str, lat_shape))}, {tokens} tokens), "
          f"{TEXT_LEN} text tokens, guidance {GUIDANCE}, e2e {steps} steps")

    import diffusers.utils.logging
    import transformers.utils.logging
    from diffusers import WanPipeline

    from vidloom import VideoGenerator

    diffusers.utils.logging.disable_progress_bar()  # loading bars; the timed calls draw none
    transformers.utils.logging.disable_progress_bar()
    folder = ensure_model_folder(args.layers, device)
    start = time.perf_counter()
    gen = VideoGenerator.from_pretrained(folder, device=str(device), dit_dtype=dtype, text_encoder_dtype=dtype,
                                         vae_dtype="fp32")
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    pipe = WanPipeline.from_pretrained(str(folder), dtype=dtype)
    pipe.vae.to(torch.float32)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    t_ref = time.perf_counter() - start
    print(f"folder: {folder}; loaded to {device} in {t_ours:.1f} s (vidloom), {t_ref:.1f} s (diffusers)")
    parts = gen.pipeline.components
    weights = {
        "step": {"vidloom": weight_bytes(parts["transformer"]), "diffusers": weight_bytes(pipe.transformer)},
        "e2e": {"vidloom": weight_bytes(parts["transformer"], parts["text_encoder"], parts["vae"]),
                "diffusers": weight_bytes(pipe.transformer, pipe.text_encoder, pipe.vae)},
    }

    meter = Meter(device)
    n = args.matmul_size or (8192 if device.type == "cuda" else 1024)
    rate = matmul_rate(device, dtype, n)
    print(f"matmul rate ({n}^3 {dtype_name}): {rate / 1e12:.3g} TFLOP/s", flush=True)

    latents = make_latents(size)
    rows, failed = {}, False

    # --- one CFG step
    print("step: 1 warm-up + %d timed runs each, interleaved" % args.repeats, flush=True)
    fns, setup = {}, {}
    try:
        fns["vidloom"] = vidloom_step_fn(gen, latents, size, steps)
    except Exception as exc:
        fns["vidloom"] = None
        prep_error = first_line(exc)
        print(f"  vidloom preparation failed: {prep_error}")
        traceback.print_exc(limit=6)
    ref_run, ref_reset = diffusers_step_fn(pipe, latents, steps, device)
    fns["diffusers"], setup["diffusers"] = ref_run, ref_reset
    res = run_interleaved(meter, {k: f for k, f in fns.items() if f is not None}, args.repeats, 1, setup)
    if fns["vidloom"] is None:
        res["vidloom"] = dict(seconds=None, peak_extra=None, out=None, error=prep_error)
    rows["step"] = res
    flops = step_flops(cfg, frames, height, width, text_len=TEXT_LEN)

    # --- end to end
    stage_times: dict = {}
    warm_size = (min(frames, 5), min(height, 128), min(width, 128))
    print(f"e2e: warm-up 1 step at {'x'.join(map(str, warm_size))}, then {args.e2e_repeats} timed run(s) each",
          flush=True)
    warm = e2e_fns(gen, pipe, warm_size, 1, make_latents(warm_size, seed=1), {})
    for name, fn in warm.items():
        if rows["step"][name]["error"] is None:
            try:
                fn()
            except Exception as exc:
                print(f"  {name} warm-up failed: {first_line(exc)}")
    fns = e2e_fns(gen, pipe, size, steps, latents, stage_times)
    rows["e2e"] = run_interleaved(meter, fns, args.e2e_repeats, 0)

    # --- report
    table = []
    header = (f"{'part':<14} {'vidloom s':>10} {'diffusers s':>11} {'ratio':>6} {'vidloom GiB':>11} "
              f"{'diffusers GiB':>13} {'mem ratio':>9} {'MFU ours':>8} {'MFU ref':>8} {'rel err':>8}")
    print()
    print(header)
    for part, res in rows.items():
        ours, ref = res["vidloom"], res["diffusers"]
        peaks = {k: (None if res[k]["peak_extra"] is None else (res[k]["peak_extra"] + weights[part][k]) / GIB)
                 for k in res}
        err = None
        if ours["out"] is not None and ref["out"] is not None:
            err = rel_err(ours["out"], ref["out"])
        mfu = {k: (flops / res[k]["seconds"] / rate if part == "step" and res[k]["seconds"] else None) for k in res}
        row = dict(part=part, vidloom_s=ours["seconds"], diffusers_s=ref["seconds"],
                   ratio=ratio(ours["seconds"], ref["seconds"]), vidloom_peak_gib=peaks["vidloom"],
                   diffusers_peak_gib=peaks["diffusers"], mem_ratio=ratio(peaks["vidloom"], peaks["diffusers"]),
                   vidloom_extra_gib=None if ours["peak_extra"] is None else ours["peak_extra"] / GIB,
                   diffusers_extra_gib=None if ref["peak_extra"] is None else ref["peak_extra"] / GIB,
                   mfu_vidloom=mfu["vidloom"], mfu_diffusers=mfu["diffusers"], rel_err=err,
                   vidloom_times=ours.get("times"), diffusers_times=ref.get("times"),
                   vidloom_error=ours["error"], diffusers_error=ref["error"])
        table.append(row)
        label = "step (CFG)" if part == "step" else f"e2e ({steps} steps)"
        print(f"{label:<14} {fmt(row['vidloom_s'], '.3f', 10)} {fmt(row['diffusers_s'], '.3f', 11)} "
              f"{fmt(row['ratio'], '.2f', 6)} {fmt(row['vidloom_peak_gib'], '.2f', 11)} "
              f"{fmt(row['diffusers_peak_gib'], '.2f', 13)} {fmt(row['mem_ratio'], '.2f', 9)} "
              f"{fmt(row['mfu_vidloom'], '.2f', 8)} {fmt(row['mfu_diffusers'], '.2f', 8)} {fmt(err, '.1e', 8)}")
        for lib in ("vidloom", "diffusers"):
            if res[lib]["error"] is not None:
                failed = True
                print(f"  {lib} FAILED: {res[lib]['error']}")
    print(f"  MFU = the step's model FLOPs ({flops / 1e12:.2f} TFLOP, the same count for both; vidloom computes the "
          f"text keys/values once per request, so at small sizes its MFU can exceed 1) / time / the matmul rate "
          f"({rate / 1e12:.3g} TFLOP/s)")
    print("  GiB = the library's own weights + its peak allocated above the call's start"
          + (" (no device memory counters off CUDA)" if device.type != "cuda" else ""))
    if stage_times:
        print("  vidloom e2e stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in stage_times.items()))

    step, e2e = table[0], table[1]

    def verdict(value, target):
        if value is None:
            return "not measured"
        return f"{value:.2f} ({'met' if value <= target else 'NOT met'}, target <= {target:.2f})"

    print(f"summary: step time vidloom/diffusers {verdict(step['ratio'], TARGET_TIME)}; end to end "
          f"{verdict(e2e['ratio'], TARGET_TIME)}; peak memory end to end {verdict(e2e['mem_ratio'], TARGET_MEMORY)} "
          f"(step {fmt(step['mem_ratio'], '.2f', 0)})")

    out_dir = CACHE / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"gpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(dict(machine=describe_machine(device), args={**vars(args), "size": list(size)},
                                    dtype=dtype_name, matmul_rate=rate, step_flops=flops, rows=table,
                                    vidloom_stage_times=stage_times), indent=2))
    print(f"results: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
