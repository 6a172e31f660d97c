"""What this CPU (and this build of torch) does fast: the one place that decides every CPU fast path.

The machines vidloom runs on differ: Intel with AMX, AMD with AVX-512 BF16, CPUs with AVX2 only,
ARM. Each fast path is taken only where it is supported and measured to pay, and the plain op is
used otherwise; the decision is read here, never from ``/proc/cpuinfo`` elsewhere.

``features()`` is detected once per process. ``forced(...)`` overrides fields for the code run
inside it (this thread/context only), so tests check a fast path's fallback on every machine:

    with cpu.forced(fused_linear_gelu=False):
        ...  # the plain matmul + GELU, whatever the CPU
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import platform

import torch


@dataclasses.dataclass(frozen=True)
class CpuFeatures:
    """The CPU's instruction sets and the fast paths they allow.

    model                the CPU's model name ("AMD EPYC", ...; the platform's processor elsewhere)
    isa                  ``torch.backends.cpu.get_cpu_capability()``: the vector ISA torch's own
                         kernels use ("AVX512", "AVX2", "DEFAULT", "SVE256", ...)
    flags                the kernel's CPU flags (Linux ``/proc/cpuinfo``; empty elsewhere)
    bf16_native          bf16 dot products in hardware (AVX-512 BF16 or AMX): bf16 matmuls are fast.
                         Without it torch runs bf16 matmuls by conversion, measured ~50x slower than
                         fp32 on an AVX2-only AMD EPYC, so bf16 is never the default there.
    fused_linear_gelu    oneDNN can build bf16 primitives here, so a bf16 Linear + tanh-GELU runs as
                         one matmul with the GELU fused (``layers.GeluLinear``). oneDNN refuses
                         bf16 inner products on a CPU without AVX-512 ("could not create a primitive
                         descriptor"), so elsewhere the two plain ops run.
    input_major_bf16     bf16 Linear weights stored input-major (``loader.weights``): ~1.5x faster
                         matmuls with AMX tiles, 2-5 % slower without (measured), so AMX only.
    winograd_fp32        fp32 3x3 VAE convolutions by Winograd F(4x4, 3x3) (``models.winograd``):
                         batched fp32 matmuls, which pay where torch has vectorised fp32 kernels.
    channels_last_vae    the VAE's inference buffers: channels-last frames written in place into
                         reused buffers (``models.causal3d.CausalCache``), same condition.
    """

    model: str
    isa: str
    flags: frozenset[str]
    bf16_native: bool
    fused_linear_gelu: bool
    input_major_bf16: bool
    winograd_fp32: bool
    channels_last_vae: bool

    def describe(self) -> str:
        on = [f.name for f in dataclasses.fields(self) if f.type == "bool" and getattr(self, f.name)]
        return f"{self.isa} ({', '.join(on) or 'plain ops only'})"


def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo (x86 and ARM spellings)."""
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = frozenset(value.split())
    except OSError:
        pass
    return model, flags


def _onednn_bf16() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    ops = getattr(torch.ops, "mkldnn", None)
    if ops is None or not hasattr(ops, "_linear_pointwise"):
        return False
    try:
        return bool(ops._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def detect() -> CpuFeatures:
    """Read this machine's features (``features()`` caches the result)."""
    isa = torch.backends.cpu.get_cpu_capability()
    model, flags = _cpuinfo()
    bf16_native = bool({"avx512_bf16", "amx_bf16"} & flags)
    amx = "amx_bf16" in flags
    vectorised = isa != "DEFAULT"
    return CpuFeatures(
        model=model,
        isa=isa,
        flags=flags,
        bf16_native=bf16_native,
        fused_linear_gelu=_onednn_bf16() and platform.machine().lower() in ("x86_64", "amd64"),
        input_major_bf16=amx,
        winograd_fp32=vectorised,
        channels_last_vae=vectorised,
    )


@functools.cache
def _detected() -> CpuFeatures:
    return detect()


_OVERRIDES: contextvars.ContextVar[dict] = contextvars.ContextVar("vidloom_cpu_overrides", default={})


def features() -> CpuFeatures:
    """This CPU's features, with any ``forced`` overrides of the current context applied."""
    found, overrides = _detected(), _OVERRIDES.get()
    return dataclasses.replace(found, **overrides) if overrides else found


@contextlib.contextmanager
def forced(**fields: bool):
    """Override fast-path decisions inside the block (e.g. ``forced(winograd_fp32=False)``).

    Forcing a path on where the CPU lacks it may fail: it is meant for forcing fallbacks."""
    known = {f.name for f in dataclasses.fields(CpuFeatures)} - {"model", "isa", "flags"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown CPU feature(s) {unknown} (known: {sorted(known)})")
    token = _OVERRIDES.set({**_OVERRIDES.get(), **fields})
    try:
        yield features()
    finally:
        _OVERRIDES.reset(token)
