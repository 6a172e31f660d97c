#!/usr/bin/env bash
# shellcheck disable=SC2317  # the parts are functions that run_part starts through bash -c
# The first thing to run on a GPU machine: everything the engine can learn there, in one call.
#
#   make gpu-wheels                  # here, with network: the wheels the GPU machine lacks, in .whl/
#   bash benchmarks/gpu_check.sh     # there, from the repository root, with .whl/ carried along
#
# It installs from .whl/ (no network, no pip needed) what the machine's Python lacks or has
# older into a temporary folder put on PYTHONPATH after the checkout (the preinstalled torch is
# used; the project is imported from the checkout, never pip-installed), then runs, each part
# under its own timeout and within VIDLOOM_GPU_CHECK_SECONDS (480) in all:
#   environment  GPU, driver, torch, CUDA, cuDNN, bf16, memory, attention kernels, what imported
#   cuda tests   pytest -m cuda $CUDA_TESTS (the files that hold cuda-marked tests)
#   gpu.py       benchmarks/gpu.py: Wan2.1-1.3B architecture at 81x480x832, random weights, one CFG
#                step and a 4-step generation vs diffusers, peak memory, utilisation
#   attention    benchmarks/attention.py on CUDA: one Wan2.1-1.3B attention layer at 17 and 81 frames of
#                480x832, sdpa vs flex vs flash/sage (where installed) vs sliding-tile windows
#   serve        benchmarks/serve.py on CUDA (step batching vs one by one at 1, 4 and 8 clients)
# A part that fails or times out is recorded with its exit status; the next part still runs.
# Everything goes to $OUT/gpu-report.md (OUT defaults to ./gpu-out), the logs and the raw JSON
# beside it. Without a CUDA device it says "no CUDA device", skips the GPU parts and exits 0;
# with one it exits 1 when any part failed, else 0.
#
# Environment: OUT; PYTHON (default: the first of python3, python, python3.12 that imports torch);
# VIDLOOM_GPU_WHEELS (.whl); VIDLOOM_GPU_CHECK_SECONDS (480);
# VIDLOOM_GPU_CHECK_ON_CPU=1 runs the GPU parts on the CPU at toy sizes instead (the CUDA tests
# with VIDLOOM_CUDA_TESTS_ON_CPU=1): a rehearsal of the script and the carried wheels on a
# machine without a GPU, which says nothing about CUDA (each part's limit x3; set the budget too).

set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
OUT=${OUT:-$REPO/gpu-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WHEELS=${VIDLOOM_GPU_WHEELS:-$REPO/.whl}
if [[ -z ${PYTHON:-} ]]; then  # the first Python on PATH that has torch
    PYTHON=python3
    for candidate in python3 python python3.12; do
        if "$candidate" -c 'import torch' >/dev/null 2>&1; then PYTHON=$candidate && break; fi
    done
fi
BUDGET=${VIDLOOM_GPU_CHECK_SECONDS:-480}
ON_CPU=${VIDLOOM_GPU_CHECK_ON_CPU:-0}
GPU_BENCH_ARGS=""  # the options of the two benchmarks, as words
# the test files that hold the cuda-marked tests, named so that collecting them imports nothing
# the carried wheels lack (the whole of tests/ would: the Postgres tests import psycopg);
# tests/test_gpu_check.py checks that `pytest -m cuda` over tests/ finds no cuda test outside them
CUDA_TESTS="tests/cuda tests/models/test_wan_dit.py tests/models/test_wan_vae.py tests/parity/test_generate_parity.py tests/test_generator.py"
SERVE_ARGS="--clients 1,4,8 --videos-per-client 2 --steps 10"
ATTENTION_ARGS="--device cuda --frames 17,81 --reps 3 --skip-video"
if [[ $ON_CPU == 1 ]]; then
    ATTENTION_ARGS="--device cpu --frames 1 --reps 1 --skip-video --flex-max-tokens 0"
    export VIDLOOM_CUDA_TESTS_ON_CPU=1
    GPU_BENCH_ARGS="--device cpu --size 5x64x64 --layers 2 --repeats 1 --steps 2"
    SERVE_ARGS="--clients 1,2 --videos-per-client 1 --steps 2"
fi
REPORT=$OUT/gpu-report.md
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vidloom-gpu-check.XXXXXX")
SITE=$WORK/site
FAILED=0
SUMMARY=()
STARTED=$SECONDS
mkdir -p "$SITE"
trap 'rm -rf "$WORK"' EXIT

say() { printf '%s\n' "$*"; }
note() { printf '%s\n' "$@" >>"$REPORT"; }  # one line per argument

# run_part NAME SECONDS LOG FUNCTION: FUNCTION (a bash function, exported) under `timeout`, its
# output to $OUT/LOG and stdout, its exit status and the log's tail into the report. The limit
# shrinks to what the budget has left.
run_part() {
    local name=$1 limit=$2 log=$3 fn=$4 left start rc verdict
    if [[ $ON_CPU == 1 ]]; then limit=$((limit * 3)); fi  # a CPU is slower at the toy sizes than a GPU at the real ones
    left=$((BUDGET - (SECONDS - STARTED)))
    if ((left < limit)); then limit=$left; fi
    if ((limit < 5)); then
        SUMMARY+=("| $name | not run: the ${BUDGET} s budget is spent | |")
        note "## $name" "" "not run: the ${BUDGET} s budget is spent" ""
        FAILED=1
        return 0
    fi
    say "== $name (limit ${limit} s)"
    start=$SECONDS
    timeout -k 10 "$limit" bash -c "$fn" 2>&1 | tee "$OUT/$log"
    rc=${PIPESTATUS[0]}
    verdict="exit $rc"
    if ((rc == 124 || rc == 137)); then verdict="exit $rc (timed out after ${limit} s)"; fi
    if ((rc != 0)); then FAILED=1; fi
    say "== $name: $verdict in $((SECONDS - start)) s"
    SUMMARY+=("| $name | $verdict | $((SECONDS - start)) s, \`$log\` |")
    note "## $name" "" "$name: $verdict in $((SECONDS - start)) s (log: \`$log\`)" "" '```'
    tail -n 60 "$OUT/$log" >>"$REPORT"
    note '```' ""
    return 0
}

# ------------------------------------------------------------------------------------ install

install_wheels() {
    # Each wheel whose distribution the machine lacks, or has at a lower version, is unpacked
    # into $SITE (a wheel is a zip laid out for site-packages); torch is never among them.
    "$PYTHON" - "$WHEELS" "$SITE" "$OUT/wheels.json" <<'EOF'
import importlib.metadata as md
import json
import re
import shutil
import sys
import zipfile
from pathlib import Path

wheels, site, record = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
try:
    from packaging.version import Version as parse
except ImportError:
    try:
        from pip._vendor.packaging.version import Version as parse
    except ImportError:
        def parse(text):
            return tuple(int(p) for p in re.findall(r"\d+", text)[:4])


def older(have, ours):
    try:
        return parse(have) < parse(ours)
    except Exception:
        return False


done = {"installed": {}, "kept": {}, "wheel_dir": str(wheels)}
files = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
for whl in files:
    name, version = whl.name.split("-")[:2]
    norm = re.sub(r"[-_.]+", "-", name).lower()
    try:
        have = md.version(norm)
    except md.PackageNotFoundError:
        have = None
    if have is not None and not older(have, version):
        done["kept"][norm] = f"{have} (carried {version})"
        continue
    with zipfile.ZipFile(whl) as z:
        z.extractall(site)
    for data in site.glob("*.data"):  # purelib / platlib parts of a wheel go to site-packages too
        for sub in ("purelib", "platlib"):
            for item in (data / sub).glob("*") if (data / sub).is_dir() else []:
                shutil.copytree(item, site / item.name, dirs_exist_ok=True) if item.is_dir() else shutil.copy2(item, site)
        shutil.rmtree(data)
    done["installed"][norm] = version + (f" (over {have})" if have else "")
record.write_text(json.dumps(done, indent=2))
print(f"{len(files)} wheels in {wheels}: {len(done['installed'])} unpacked into {site}, "
      f"{len(done['kept'])} kept as the machine has them")
for key in ("installed", "kept"):
    print(f"{key}: " + (", ".join(f"{k} {v}" for k, v in done[key].items()) or "none"))
EOF
}

# ------------------------------------------------------------------------------------ environment

environment() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu,power.limit,clocks.max.sm \
            --format=csv || true
        nvidia-smi topo -m 2>/dev/null | head -n 8 || true
    else
        say "nvidia-smi: not found"
    fi
    say "ffmpeg: $(command -v ffmpeg || echo none)"
    say "cpus: $(nproc 2>/dev/null); memory: $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}'); disk free: $(df -h "$WORK" | awk 'NR==2 {print $4}')"
    "$PYTHON" - "$OUT/env.json" "$SITE" "$REPO" <<'EOF'
import importlib
import importlib.metadata as md
import json
import os
import platform
import sys
import time

out, site, repo = sys.argv[1:4]
env = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
       "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
import torch

env.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
           cuda_available=torch.cuda.is_available(), device_count=torch.cuda.device_count())
print(f"python {env['python']} ({sys.executable}); torch {torch.__version__}, built for CUDA {torch.version.cuda}, "
      f"cuDNN {env['cudnn']}; torch.cuda.is_available(): {env['cuda_available']}, devices: {env['device_count']}")
devices = []
for i in range(env["device_count"] if env["cuda_available"] else 0):
    p = torch.cuda.get_device_properties(i)
    free, total = torch.cuda.mem_get_info(i)
    d = dict(index=i, name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
             total_gib=round(total / 2**30, 2), free_gib=round(free / 2**30, 2))
    devices.append(d)
    print(f"cuda:{i}: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {d['total_gib']} GiB "
          f"({d['free_gib']} free)")
env["devices"] = devices
if env["cuda_available"]:
    env["driver"] = getattr(torch._C, "_cuda_getDriverVersion", lambda: None)()
    env["bf16_supported"] = torch.cuda.is_bf16_supported()
    env["arch_list"] = torch.cuda.get_arch_list()
    checks = {}
    try:  # a bf16 matmul and the attention kernels torch picks for the DiT's shapes
        a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
        checks["bf16_matmul_tflops"] = round(10 * 2 * 4096**3 / (time.perf_counter() - start) / 1e12, 1)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q = torch.randn(2, 12, 4096, 128, device="cuda", dtype=torch.bfloat16)
        for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            try:
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    torch.nn.functional.scaled_dot_product_attention(q, q, q)
                checks[backend.lower()] = "works"
            except Exception as exc:
                checks[backend.lower()] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    except Exception as exc:
        checks["error"] = f"{type(exc).__name__}: {exc}"
    env["checks"] = checks
    print(f"driver (torch): {env['driver']}; bf16: {env['bf16_supported']}; arch list: {env['arch_list']}")
    print("checks: " + ", ".join(f"{k} {v}" for k, v in checks.items()))
modules = {}
for name in ("numpy", "safetensors", "transformers", "tokenizers", "sentencepiece", "ftfy", "imageio",
             "imageio_ffmpeg", "PIL", "tqdm", "diffusers", "accelerate", "huggingface_hub", "fastapi", "uvicorn",
             "starlette", "multipart", "prometheus_client", "httpx", "openai", "pytest", "xdist", "av", "vidloom"):
    try:
        m = importlib.import_module(name)
        where = os.path.dirname(getattr(m, "__file__", "") or "")
        origin = "carried" if where.startswith(site) else "checkout" if where.startswith(repo) else "machine"
        modules[name] = f"{getattr(m, '__version__', '?')} ({origin})"
    except Exception as exc:
        modules[name] = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
env["modules"] = modules
print("imports: " + "; ".join(f"{k} {v}" for k, v in modules.items()))
try:
    from vidloom.config import EngineConfig

    config = EngineConfig()
    env["engine_default"] = dict(device=config.device, dtypes={k: str(v) for k, v in config.resolved_dtypes().items()})
    print(f"vidloom EngineConfig() (device auto): {env['engine_default']}")
except Exception as exc:
    env["engine_default"] = f"FAILED: {type(exc).__name__}: {exc}"
    print(f"vidloom EngineConfig(): {env['engine_default']}")
with open(out, "w") as fh:
    json.dump(env, fh, indent=2, default=str)
bad = [k for k, v in modules.items() if v.startswith("FAILED") and k not in ("av",)]
sys.exit(1 if bad else 0)
EOF
}

has_cuda() {
    "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1
}

# ------------------------------------------------------------------------------------ GPU parts

cuda_tests() {
    # shellcheck disable=SC2086  # the paths, split on purpose
    "$PYTHON" -m pytest -m cuda $CUDA_TESTS -v -rs -p no:cacheprovider --durations=15 \
        --junitxml="$OUT/pytest-cuda.xml"
}

gpu_bench() {
    local rc sampler=""
    if command -v nvidia-smi >/dev/null 2>&1; then  # utilisation and memory every 500 ms while it runs
        nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw --format=csv -lms 500 \
            >"$OUT/gpu-bench-nvidia-smi.csv" 2>/dev/null &
        sampler=$!
    fi
    # shellcheck disable=SC2086  # the options, split on purpose
    VIDLOOM_GPU_BENCH_CACHE=$WORK/bench "$PYTHON" benchmarks/gpu.py $GPU_BENCH_ARGS
    rc=$?
    if [[ -n $sampler ]]; then kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null; fi
    cp "$WORK"/bench/results/gpu-*.json "$OUT/gpu-bench.json" 2>/dev/null
    return "$rc"
}

attention_bench() {
    # shellcheck disable=SC2086  # the options, split on purpose
    VIDLOOM_BENCH_CACHE=$WORK/bench "$PYTHON" benchmarks/attention.py $ATTENTION_ARGS
}

serve_bench() {
    local rc
    if ! "$PYTHON" -c 'import imageio_ffmpeg; imageio_ffmpeg.get_ffmpeg_exe()' >/dev/null 2>&1; then
        # no ffmpeg binary here (.whl carries imageio-ffmpeg without its 66 MB binary): the jobs'
        # MP4 export goes to a stand-in that discards the frames, so the engine's throughput is
        # measured without the encode
        mkdir -p "$WORK/bin"
        cat >"$WORK/bin/ffmpeg" <<'EOF'
#!/bin/sh
for last in "$@"; do :; done
cat >/dev/null
path=${last#file:}
: >"$path"
EOF
        chmod +x "$WORK/bin/ffmpeg"
        export IMAGEIO_FFMPEG_EXE=$WORK/bin/ffmpeg
        say "no ffmpeg binary: MP4 export replaced by a stand-in that discards the frames (encode time not measured)"
    fi
    # shellcheck disable=SC2086  # the options, split on purpose
    VIDLOOM_BENCH_CACHE=$WORK/bench "$PYTHON" benchmarks/serve.py $SERVE_ARGS
    rc=$?
    cp "$WORK/bench/results/serve.json" "$OUT/serve.json" 2>/dev/null
    return "$rc"
}

# ------------------------------------------------------------------------------------ main

export REPO OUT WHEELS PYTHON SITE WORK GPU_BENCH_ARGS SERVE_ARGS CUDA_TESTS ATTENTION_ARGS
export -f say install_wheels environment cuda_tests gpu_bench attention_bench serve_bench

{
    say "# vidloom GPU check"
    say ""
    commit=unknown
    if git -C "$REPO" rev-parse --short HEAD >/dev/null 2>&1; then
        commit=$(git -C "$REPO" rev-parse --short HEAD)
        git -C "$REPO" diff --quiet HEAD 2>/dev/null || commit="$commit (with local changes)"
    fi
    say "$(date -u '+%Y-%m-%d %H:%M:%S UTC'); commit $commit; host $(hostname 2>/dev/null || echo unknown)"
    say ""
} >"$REPORT"

run_part "install" 60 install.log install_wheels
export PYTHONPATH=$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
run_part "environment" 60 env.log environment

if [[ $ON_CPU == 1 ]] || has_cuda; then
    where=""
    if [[ $ON_CPU == 1 ]]; then
        where=" (on the CPU)"
        note "**A rehearsal on the CPU (VIDLOOM_GPU_CHECK_ON_CPU=1): toy sizes, nothing about CUDA.**" ""
    fi
    run_part "pytest -m cuda$where" 150 pytest-cuda.log cuda_tests
    run_part "benchmarks/gpu.py$where" 180 gpu-bench.log gpu_bench
    run_part "benchmarks/attention.py$where" 60 attention.log attention_bench
    run_part "benchmarks/serve.py$where" 150 serve.log serve_bench
else
    FAILED=0
    note "## no CUDA device" "" \
        "no CUDA device: torch.cuda.is_available() is False here (or torch did not import; see environment)." \
        "The GPU parts were skipped: pytest -m cuda, benchmarks/gpu.py, benchmarks/attention.py, benchmarks/serve.py." ""
    say "no CUDA device: the GPU parts (pytest -m cuda, benchmarks/gpu.py, benchmarks/attention.py, benchmarks/serve.py) skipped"
fi

note "## Summary" "" "| part | status | time, log |" "| --- | --- | --- |"
for row in "${SUMMARY[@]}"; do note "$row"; done
note "" "total $((SECONDS - STARTED)) s of the ${BUDGET} s budget"
say "report: $REPORT"
exit "$FAILED"
