"""Command line: ``vidloom generate``, ``vidloom info`` and ``vidloom serve``.

The flags come from the fields of ``EngineConfig`` and ``SamplingParams`` (a few get a
shorter name), so the CLI never restates an option's default.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
import types
import typing
from pathlib import Path

from .config import EngineConfig, RefineParams, SamplingParams, check_text
from .default_model import DEFAULT_I2V_MODEL_DIR, DEFAULT_MODEL_DIR, sampling_defaults
from .errors import VidloomError
from .lora import parse_lora_option
from .parallel.state import check_layout

# SamplingParams fields the CLI sets itself, or that are not for the command line
SAMPLING_SKIP = {"prompt", "latents", "output_type", "output_path", "return_trajectory", "decode_trajectory"}
SHORT_FLAGS = {"num_inference_steps": "--steps"}
ENGINE_DTYPE_FIELDS = {"dtype", "dit_dtype", "vae_dtype", "text_encoder_dtype"}
MAX_NPROC = 64  # processes one --nproc starts on this machine
MAX_PROMPTS = 64  # prompts one --prompts-file holds (they run as one step-batched group)
MAX_PROMPTS_FILE_BYTES = 4 << 20  # read no further: 64 prompts of any allowed length fit well within
DEVICE_HELP = "auto (default: cuda where torch sees a CUDA device, else cpu), cpu, cuda or cuda:N"


def _scalar_type(annotation) -> type | None:
    """int/float/str/bool from a field annotation (Optional[...] unwrapped), else None."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in args if a is not type(None)]
        return args[0] if len(args) == 1 and args[0] in (int, float, str, bool) else None
    return annotation if annotation in (int, float, str, bool) else None


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip=frozenset(), dest_prefix="",
                         flag_prefix="") -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = SHORT_FLAGS.get(f.name, "--" + f.name.replace("_", "-"))
        if flag_prefix:
            flag = "--" + flag_prefix + f.name.replace("_", "-")
        dest = dest_prefix + f.name
        if f.name in ENGINE_DTYPE_FIELDS:
            parser.add_argument(flag, dest=dest, default=None, choices=["fp32", "bf16", "fp16"],
                                help=f"{f.name} (default: engine default)")
            continue
        kind = _scalar_type(hints[f.name])
        if kind is None:
            continue
        if f.name == "device":
            parser.add_argument(flag, dest=dest, default=None, metavar="DEVICE", help=DEVICE_HELP)
        elif kind is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                                help=f"default: {f.default}")
        else:
            parser.add_argument(flag, dest=dest, type=kind, default=None, metavar=f.name.upper(),
                                help=f"default: {f.default}")


def _collect(args: argparse.Namespace, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidloom", description="Video diffusion inference engine (Wan family)")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a video from a prompt")
    gen.add_argument("--model", type=Path, default=None,
                     help="Diffusers-format model folder (with model_index.json); default: the shipped model, "
                          "a small Wan2.1 trained on moving shapes, with its own default size and steps")
    prompts = gen.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt")
    prompts.add_argument("--prompts-file", type=Path, default=None, metavar="FILE",
                         help=f"one prompt a line (blank lines skipped, at most {MAX_PROMPTS}), all run together as "
                              "one step-batched group; --output is numbered: out-0.mp4, out-1.mp4, ...")
    gen.add_argument("--num-videos-per-prompt", type=int, default=1, metavar="N",
                     help="N videos of each prompt, with seeds seed, seed+1, ..., seed+N-1")
    gen.add_argument("--output", default="outputs/video.mp4",
                     help="output file: .mp4, .gif, .npy (float32 frames) or a folder for PNG frames")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    lora_help = ("a LoRA file (diffusers/PEFT, kohya/musubi or LightX2V/ComfyUI safetensors), or the name of an "
                 "adapter the model folder ships in lora/ (the default model's: distill-4step, 4 steps without "
                 "guidance), merged into the ")
    gen.add_argument("--lora", dest="e_loras", action="append", type=parse_lora_option, default=None,
                     metavar="FILE[:SCALE]", help=lora_help + "transformer; repeat to stack adapters")
    gen.add_argument("--lora-2", dest="e_loras_2", action="append", type=parse_lora_option, default=None,
                     metavar="FILE[:SCALE]", help=lora_help + "second transformer (transformer_2) of a two-expert model")
    gen.add_argument("--profile", type=Path, default=None, metavar="DIR",
                     help="profile the run with torch.profiler: a trace in DIR/trace.json (Perfetto, chrome://tracing) "
                          "and the top operators per stage printed")
    gen.add_argument("--nproc", type=int, default=1,
                     help="start this many processes (as torchrun does) for --sp-size / --cfg-parallel")
    sampling = gen.add_argument_group("sampling")
    sampling.add_argument("--image", dest="s_image", default=None, metavar="FILE",
                          help="image-to-video: the first frame (PNG, JPEG, ...)")
    sampling.add_argument("--last-image", dest="s_last_image", default=None, metavar="FILE",
                          help="first-last-frame-to-video: the last frame")
    _add_dataclass_flags(sampling, SamplingParams, SAMPLING_SKIP, "s_")
    _add_dataclass_flags(gen.add_argument_group(
        "two-stage generation", "any of these turns it on: the base pass at 1/scale of the size, then the refine "
        "pass at full size (see RefineParams)"), RefineParams, dest_prefix="r_", flag_prefix="refine-")
    _add_dataclass_flags(gen.add_argument_group("engine"), EngineConfig, dest_prefix="e_")

    cal = sub.add_parser("calibrate-cache", help="fit TeaCache and MagCache to a model folder (writes "
                         "vidloom_cache.json beside model_index.json)")
    cal.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    cal.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                     help="one prompt a line (default: four built-in prompts)")
    cal.add_argument("--steps", type=int, default=40, help="steps of the calibration runs (default 40)")
    cal.add_argument("--height", type=int, default=None)
    cal.add_argument("--width", type=int, default=None)
    cal.add_argument("--num-frames", type=int, default=None)
    cal.add_argument("--guidance-scale", type=float, default=None)
    _add_dataclass_flags(cal.add_argument_group("engine"), EngineConfig, dest_prefix="e_")

    info = sub.add_parser("info", help="describe a model folder")
    info.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    info.add_argument("--height", type=int, default=None, help="the request the memory estimate is for "
                      "(default: the folder's default size)")
    info.add_argument("--width", type=int, default=None)
    info.add_argument("--num-frames", type=int, default=None)
    _add_dataclass_flags(info.add_argument_group("engine"), EngineConfig, dest_prefix="e_")

    serve = sub.add_parser("serve", help="serve the OpenAI Videos API (/v1/videos) over a durable job queue")
    serve.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    serve.add_argument("--host", default="127.0.0.1", help="anything but loopback needs --api-key")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--data-dir", type=Path, default=Path("vidloom-data"),
                       help="the job store (jobs.sqlite3), uploaded images (inputs/) and videos (videos/)")
    serve.add_argument("--api-key", default=os.environ.get("VIDLOOM_API_KEY"),
                       help="required as 'Authorization: Bearer KEY' (default: $VIDLOOM_API_KEY)")
    serve.add_argument("--max-queue", type=int, default=64, help="queued jobs beyond which requests get 429")
    serve.add_argument("--lora-dir", type=Path, default=None, metavar="DIR",
                       help="load every DIR/*.safetensors LoRA unmerged, named by its file stem; requests choose "
                            'among them: "lora": [{"name": ..., "scale": ...}] (GET /v1/models lists them)')
    serve.add_argument("--nproc", type=int, default=1,
                       help="serve from this many processes (--sp-size / --cfg-parallel): rank 0 runs HTTP and the "
                            "queue and sends each round of work to the others")
    serve.add_argument("--store", default=None, metavar="postgresql://...",
                       help="a PostgreSQL queue shared by several replicas (default: SQLite in --data-dir); "
                            "replicas share --data-dir too (the videos are files there). What the URL leaves out "
                            "comes from libpq's PG* variables (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE, "
                            "PGPASSFILE, PGSERVICE): give the password there, not in the URL, where ps shows it, "
                            "e.g. --store postgresql:// or --store postgresql://db.example/vidloom")
    serve.add_argument("--lease-seconds", type=float, default=15.0,
                       help="with --store: how long a replica holds a job without renewing it before another "
                            "takes it over")
    _add_dataclass_flags(serve.add_argument_group("engine"), EngineConfig, dest_prefix="e_")
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .generator import VideoGenerator
    from .serve.app import ServeSettings, create_app, is_loopback, open_store

    if not is_loopback(args.host) and not args.api_key:
        raise ValueError(f"--host {args.host}: serving beyond loopback needs --api-key (or $VIDLOOM_API_KEY); "
                         "a name counts as loopback only when every address it resolves to is")
    if not 1 <= args.nproc <= MAX_NPROC:
        raise ValueError(f"--nproc: expected an integer in 1..{MAX_NPROC}, got {args.nproc}")
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port: expected 1..65535, got {args.port}")
    if not 1 <= args.max_queue <= 100_000:
        raise ValueError(f"--max-queue: expected 1..100000, got {args.max_queue}")
    if args.model is None:
        args.model = DEFAULT_MODEL_DIR
    defaults = sampling_defaults(args.model)  # a shipped model's own size and settings
    engine = EngineConfig.from_options(**_collect(args, "e_"))
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        check_layout(engine.sp_size, engine.cfg_parallel, args.nproc, ring_size=engine.ring_size,
                     tp_size=engine.tp_size)
        VideoGenerator.request_limits(args.model, engine)  # the folder checked before any process starts
        return launch(args.nproc, args.argv)
    if args.store is not None:
        if not args.store.startswith(("postgresql://", "postgres://")):  # echoes no password
            scheme, sep, _ = args.store.partition("://")
            shown = f", got {scheme[:20]}://..." if sep and scheme.replace("+", "").isalnum() else ""
            raise ValueError(f"--store: expected a postgresql:// URL{shown}")
        if not 1.0 <= args.lease_seconds <= 3600:
            raise ValueError(f"--lease-seconds: expected 1..3600, got {args.lease_seconds}")

    def store():  # before the model is loaded where this process serves alone: a bad store fails fast
        return open_store(args.data_dir, args.store, args.lease_seconds if args.store is not None else None)

    job_store = store() if "WORLD_SIZE" not in os.environ else None
    generator = VideoGenerator.from_pretrained(args.model, engine)
    if args.lora_dir is not None:  # every process loads them: requests choose among them by name
        for path in lora_files(args.lora_dir):  # with --max-loras, loaded at their first request
            if engine.max_loras is None:
                generator.load_lora(path, name=path.stem)
            else:
                generator.register_lora(path, name=path.stem)
    ranks = None
    if generator.parallel is not None:
        from .serve.scheduler import RankBroadcast, follow

        ranks = RankBroadcast()
        if ranks.rank != 0:
            follow(generator, ranks)
            return 0
    defaults.update(generator.request_defaults)  # a merged adapter's own settings (a distilled one's steps)
    adapter_defaults = tuple((name, tuple(d.items())) for name, d in generator.adapter_sampling.items() if d)
    settings = ServeSettings(model_name=Path(args.model).name, data_dir=args.data_dir, api_key=args.api_key,
                             max_queue=args.max_queue, defaults=tuple(defaults.items()), allowed_hosts=(args.host,),
                             adapter_defaults=adapter_defaults)
    app = create_app(generator, settings, store=job_store or store(), start_loop=False, ranks=ranks)
    # HTTP in a thread, the engine loop in the main thread (torch's CPU kernels are slower
    # from a second thread; see EngineLoop.start)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="vidloom-http", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise ValueError(f"--host {args.host} --port {args.port}: the HTTP server did not start (port in use?)")
        time.sleep(0.05)
    print(f"serving {settings.model_name} on http://{args.host}:{args.port}/v1 (data in {args.data_dir}; "
          f"{app.state.recovered} job(s) resumed)", flush=True)
    # SIGTERM drains: the unit of work under way finishes, the running jobs go back to the queue,
    # HTTP stops after the requests in flight, and the process exits 0
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: app.state.loop.stop())
    try:
        app.state.loop.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.should_exit = True
        thread.join(30)
        app.state.store.close()
    return 0


MAX_LORA_FILES = 256


def lora_files(folder: Path) -> list[Path]:
    """The ``*.safetensors`` files of a ``--lora-dir`` (each an adapter named by its stem)."""
    if not folder.is_dir():
        raise ValueError(f"--lora-dir: {folder} is not a folder")
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if len(files) > MAX_LORA_FILES:
        raise ValueError(f"--lora-dir: {len(files)} adapters, at most {MAX_LORA_FILES}")
    return files


def lora_sampling(engine: EngineConfig, folder) -> dict:
    """The request settings the engine's adapters (``--lora``, ``--lora-2``) were trained for."""
    from .lora import LoraError, adapter_sampling, resolve_lora

    out = {}
    for option, loras in (("--lora", engine.loras), ("--lora-2", engine.loras_2)):
        for file, _ in loras:
            try:
                out.update(adapter_sampling(resolve_lora(file, folder)))
            except LoraError as exc:
                raise ValueError(f"{option}: {exc}") from None
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .generator import VideoGenerator, video_requests
    from .request import decode_images

    from transformers.utils import logging as hf_logging

    if not 1 <= args.nproc <= MAX_NPROC:
        raise ValueError(f"--nproc: expected an integer in 1..{MAX_NPROC}, got {args.nproc}")
    prompt = read_prompts_file(args.prompts_file) if args.prompts_file is not None else args.prompt
    engine = EngineConfig.from_options(**_collect(args, "e_"))
    sampling = _collect(args, "s_")
    refine = _collect(args, "r_")
    if refine:
        sampling["refine"] = RefineParams(**refine)
    if args.model is None:  # the shipped models: the image-to-video sibling when a first frame is given
        args.model = DEFAULT_I2V_MODEL_DIR if sampling.get("image") is not None else DEFAULT_MODEL_DIR
    # a shipped model's settings, then those its adapters were trained for; what the user gave wins
    sampling = {**sampling_defaults(args.model), **lora_sampling(engine, args.model), **sampling}
    # check the whole folder and every request against it before any weight is read (and, with
    # --nproc, before any process is started)
    limits = VideoGenerator.request_limits(args.model, engine)
    for r in video_requests(prompt, args.num_videos_per_prompt, sampling.get("seed", SamplingParams.seed),
                            args.output):
        SamplingParams.from_kwargs(r.prompt, **{**sampling, "seed": r.seed, "output_path": r.output_path}
                                   ).validate(limits)
    # the image files decoded once (bounded), before any weight is read; the requests take them decoded
    sampling.update(decode_images(sampling))
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        check_layout(engine.sp_size, engine.cfg_parallel, args.nproc, ring_size=engine.ring_size,
                     tp_size=engine.tp_size)
        return launch(args.nproc, args.argv)
    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    size = {k: sampling.get(k, getattr(SamplingParams, k)) for k in ("height", "width", "num_frames")}
    generator = VideoGenerator.from_pretrained(args.model, config=engine, size_hint=size)
    load_s = time.perf_counter() - start
    tasks = generator.submit_many(prompt, args.num_videos_per_prompt, output_path=args.output, **sampling)
    quiet = args.quiet or not generator.is_main_process  # one progress bar and one report, from rank 0
    with tqdm(total=sum(t.total_units + 1 for t in tasks), disable=quiet, desc="vidloom", unit="unit",
              file=sys.stderr) as bar:
        def advance(tasks):
            bar.update(sum(t.units_done for t in tasks) - bar.n)
            done = sum(t.is_finished for t in tasks)
            bar.set_postfix_str(tasks[0].status if len(tasks) == 1 else f"{done}/{len(tasks)} videos done")

        with contextlib.ExitStack() as stack:
            profile = None
            if args.profile is not None:
                from .profiling import profiling

                rank = generator.parallel.rank if generator.parallel is not None else 0
                profile = stack.enter_context(profiling(args.profile if rank == 0 else args.profile / f"rank-{rank}"))
            outs = generator.run_many(tasks, on_round=advance)
    if profile is not None and generator.is_main_process:
        print(profile.summary())
    if not generator.is_main_process:
        return 0
    for out in outs:
        p = out.params
        stages = ", ".join(f"{name} {secs:.2f} s" for name, secs in out.timings.items() if secs >= 0.005)
        print(f"wrote {out.path} ({p.num_frames} frames, {p.width}x{p.height}, {p.fps} fps); "
              f"load {load_s:.2f} s, {stages}{cache_summary(p.cache, out.cache)}")
    return 0


def cache_summary(spec, report: dict) -> str:
    """``; cache <spec>: ...`` for a run with a feature cache (empty without one): what it computed
    and skipped, and its own estimate of the change it skipped over."""
    if not report:
        return ""
    parts = [f"{int(report.get('forwards', 0))} forwards"]
    blocks = report.get("blocks_computed", 0) + report.get("blocks_skipped", 0)
    if blocks:
        parts.append(f"blocks {int(report.get('blocks_skipped', 0))}/{int(blocks)} skipped")
    if "uncond_skipped" in report:
        parts.append(f"{int(report['uncond_skipped'])} unconditional skipped")
    if "estimated_change" in report:
        parts.append(f"estimated change {report['estimated_change']:.3g}")
    return f"; cache {spec}: " + ", ".join(parts)


def read_prompts_file(path: Path) -> list[str]:
    """The prompts of a ``--prompts-file``: UTF-8 text, one prompt a line, surrounding blanks
    stripped and blank lines skipped; at least one and at most MAX_PROMPTS, each checked as a
    prompt is. ValueError naming the flag (and the line) otherwise."""
    if not path.exists():
        raise ValueError(f"--prompts-file: no such file {path}")
    if not path.is_file():
        raise ValueError(f"--prompts-file: {path} is not a regular file")
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_PROMPTS_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"--prompts-file: cannot read {path} ({exc.strerror or exc})") from None
    if len(data) > MAX_PROMPTS_FILE_BYTES:
        raise ValueError(f"--prompts-file: {path} is larger than {MAX_PROMPTS_FILE_BYTES >> 20} MiB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"--prompts-file: {path} is not UTF-8 text (byte {exc.start})") from None
    prompts = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.strip()
        if not line:
            continue
        if len(prompts) == MAX_PROMPTS:
            raise ValueError(f"--prompts-file: more than {MAX_PROMPTS} prompts (line {number})")
        prompts.append(check_text(f"--prompts-file line {number}", line))
    if not prompts:
        raise ValueError(f"--prompts-file: {path} holds no prompt (every line is blank)")
    return prompts


def launch(nproc: int, argv: list[str]) -> int:
    """Run this command in ``nproc`` processes under torch's own launcher (what ``torchrun`` runs):
    it sets each process's rank and, when one fails, stops the others and reports the error."""
    import subprocess

    forwarded = []
    skip = False
    for arg in argv:  # the same command without --nproc
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            forwarded.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "vidloom", *forwarded]
    child = subprocess.Popen(cmd)
    # a SIGTERM to this process (a service manager stopping `vidloom serve`) stops the processes too
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: child.terminate())
    try:
        return child.wait()
    except KeyboardInterrupt:
        child.terminate()
        return child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_calibrate_cache(args: argparse.Namespace) -> int:
    """Uncached runs of the prompts, the fitted calibration written into the folder, and the
    speed-up each of a few thresholds would give on those runs."""
    from .cache.calibrate import DEFAULT_PROMPTS, calibrate, predicted_speedups, write_calibration
    from .cache.spec import MagCache, TeaCache
    from .generator import VideoGenerator

    folder = args.model or DEFAULT_MODEL_DIR
    prompts = read_prompts_file(args.prompts) if args.prompts else list(DEFAULT_PROMPTS)
    if not 2 <= args.steps <= 1000:
        raise ValueError(f"--steps: got {args.steps} (allowed: 2..1000)")
    sampling = {k: v for k, v in sampling_defaults(folder).items() if k != "num_inference_steps"}
    given = dict(height=args.height, width=args.width, num_frames=args.num_frames, guidance_scale=args.guidance_scale)
    sampling.update({k: v for k, v in given.items() if v is not None})
    generator = VideoGenerator.from_pretrained(folder, config=EngineConfig.from_options(**_collect(args, "e_")))
    start = time.perf_counter()
    calibration, records = calibrate(generator, prompts, args.steps, **sampling)
    path = write_calibration(folder, calibration)
    print(f"calibrated {folder} on {len(prompts)} prompts x {args.steps} steps in "
          f"{time.perf_counter() - start:.1f} s; wrote {path}")
    specs = [TeaCache(t) for t in (0.05, 0.1, 0.2, 0.4)] + [MagCache(t) for t in (0.05, 0.1, 0.2)]
    for text, speedup in predicted_speedups(records, calibration, specs).items():
        print(f"  --cache {text:24} predicted {speedup:.2f}x fewer block evaluations at {args.steps} steps")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .loader.components import read_model_index
    from .pipelines import pipeline_class

    folder = args.model or DEFAULT_MODEL_DIR
    index = read_model_index(folder)
    print(f"pipeline: {printable(index['_class_name'])}")
    try:
        pipe_cls = pipeline_class(index["_class_name"])
    except KeyError:
        print("variant: not supported by this engine")
    else:
        print(f"variant: {pipe_cls.read_variant(index, str(folder / 'model_index.json')).describe()}")
    for name, spec in index.items():
        if not name.startswith("_"):
            print(f"  {printable(name)}: {printable(spec)}")
    print_memory_estimate(folder, args)
    return 0


def print_memory_estimate(folder: Path, args: argparse.Namespace) -> None:
    """Each model component's bytes in memory and the estimated peak of a request at each level."""
    from .loader.plan import plan_folder
    from .memory.budget import level_peaks, model_dtypes
    from .memory.estimate import GIB, component_sizes, machine_memory

    config = EngineConfig.from_options(**_collect(args, "e_"))
    try:
        plan = plan_folder(folder, config)
    except (VidloomError, ValueError) as exc:
        print(f"memory: not estimated ({printable(str(exc))})")
        return
    size = {"num_frames": SamplingParams.num_frames, "height": SamplingParams.height, "width": SamplingParams.width,
            **sampling_defaults(folder)}
    frames, height, width = (args.num_frames or size["num_frames"], args.height or size["height"],
                             args.width or size["width"])
    dtypes = model_dtypes(plan.plans, config)
    sizes = component_sizes(plan.plans, dtypes)  # the weight headers read once, for both tables
    print(f"memory (a {frames}x{height}x{width} request, guided; {machine_memory(config.torch_device) / GIB:.1f} GiB "
          "available now):")
    for name, size in sizes.items():
        note = f" ({size.stored / GIB:.2f} GiB with blocks as stored, level 2)" if size.stored != size.widened else ""
        print(f"  {printable(name):14} {size.widened / GIB:7.2f} GiB as "
              f"{str(dtypes[name]).removeprefix('torch.')}{note}")
    for level, peak in level_peaks(plan.plans, config, frames, height, width, sizes=sizes).items():
        print(f"  low_mem_level {level}: estimated peak {peak / GIB:.2f} GiB")


def printable(value) -> str:
    """``value`` as text with every control character escaped: what a model folder says must not
    reach the terminal as escape sequences (clearing the screen, retitling the window)."""
    text = value if isinstance(value, str) else repr(value)
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        commands = {"generate": cmd_generate, "info": cmd_info, "serve": cmd_serve,
                    "calibrate-cache": cmd_calibrate_cache}
        return commands[args.command](args)
    except (VidloomError, ValueError) as exc:
        print(f"error: {printable(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
