"""The one attention entry point every model calls.

Models hand over queries, keys and values in (batch, tokens, heads, head_dim) layout and say
which attention it is: ``kind="self"`` over the token sequence itself, ``kind="cross"`` to a
whole context such as text. What runs it travels in one frozen ``AttentionContext``: the
sequence-parallel object and the ``Backend`` (the local kernel, from ``BACKENDS``). The context
is set from outside around a forward (``attention_context``, ``sequence_parallel``,
``sliding_window``), so model files hold neither distributed code nor a kernel choice. While a
sequence-parallel object is active, ``shard_sequence`` / ``gather_sequence`` split and join the
token sequence and self-attention runs through its exchange; with none they are identities.

Backends (``BACKENDS``): ``sdpa`` (torch's fused kernels, the default), ``flex`` (torch's
``flex_attention``, compiled; CPU and CUDA), ``flash`` (flash-attn 3 or 2, CUDA) and ``sage``
(SageAttention, INT8 QK, CUDA, not exact), the last two imported only when selected. A
sliding-tile window (``AttentionContext.window``, see ``models.sliding_tile``) makes a 3-D
self-attention attend only to nearby tiles of the token grid, each tile by the backend.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Callable, Literal, Protocol

import torch
import torch.nn.functional as F

# The whole token sequence's grid, e.g. (frames, rows, columns) after patching, in token order.
# Its product is the sequence's length before any sharding or padding.
Layout = tuple[int, ...]

# query rows per block of the log-sum-exp path: its float32 scores are (B, H, 1024, Lk)
LSE_QUERY_CHUNK = 1024


@dataclasses.dataclass(frozen=True)
class Backend:
    """A local attention kernel and what it supports.

    ``fn(q, k, v, *, bias=None, layout=None, return_lse=False)``: q (B, Lq, H, D), k/v (B, Lk, H, D)
    -> out (B, Lq, H, D); with ``return_lse`` (only if ``returns_lse``) -> (out, lse (B, Lq, H)
    float32), lse the log-sum-exp of each query's scaled scores. ``bias`` as for ``attention``;
    ``layout`` the token grid of a self-attention (None elsewhere). ``exact``: the full softmax
    attention up to rounding (not a sparse or quantised approximation).
    """

    name: str
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    supports_bias: bool
    returns_lse: bool
    exact: bool
    max_head_dim: int | None = None  # the largest head dim the kernel takes (None: any)
    # why the kernel cannot run in this process (a package missing, no CUDA), or None
    unavailable: Callable[[], str | None] = lambda: None

    def check(self, q: torch.Tensor) -> None:
        """A clear error where the kernel cannot run q's device, dtype or head dim."""
        if q.device.type not in self.devices:
            raise ValueError(f"attention backend {self.name!r}: runs on {', '.join(sorted(self.devices))}, "
                             f"not {q.device.type}")
        if q.dtype not in self.dtypes:
            names = ", ".join(sorted(_dtype_name(d) for d in self.dtypes))
            raise ValueError(f"attention backend {self.name!r}: takes {names}, not {_dtype_name(q.dtype)}")
        if self.max_head_dim is not None and q.shape[-1] > self.max_head_dim:
            raise ValueError(f"attention backend {self.name!r}: head dim at most {self.max_head_dim}, not {q.shape[-1]}")

    def check_engine(self, device: torch.device, dtype: torch.dtype) -> None:
        """Before loading: a one-line error where this kernel cannot serve an engine computing in
        ``dtype`` on ``device`` (package missing, wrong device or dtype)."""
        reason = self.unavailable()
        if reason is not None:
            raise ValueError(f"attention_backend {self.name!r}: {reason}")
        if device.type not in self.devices:
            raise ValueError(f"attention_backend {self.name!r}: runs on {', '.join(sorted(self.devices))}, "
                             f"not {device.type} (allowed here: {', '.join(available_backends(device, dtype))})")
        if dtype not in self.dtypes:
            names = ", ".join(sorted(_dtype_name(d) for d in self.dtypes))
            raise ValueError(f"attention_backend {self.name!r}: takes {names}, but the transformer computes in "
                             f"{_dtype_name(dtype)} (allowed here: {', '.join(available_backends(device, dtype))})")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _broadcast_bias(bias: torch.Tensor) -> torch.Tensor:
    """A score bias (Lk,) or (B, Lk) -> a view broadcasting over the scores (B, H, Lq, Lk)."""
    return bias.view(1, 1, 1, -1) if bias.ndim == 1 else bias[:, None, None, :]


def _score_mask(bias: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """SDPA's additive mask for ``bias``."""
    if bias is None:
        return None
    # float32 even for bf16 q on the CPU: the log-weights stay exact. CUDA's fused kernels take a
    # mask only in q's dtype; there log m (< 7 for 512 keys) rounds by at most 1/64 in bf16, a
    # weight within 1.6 % of m, the size of bf16's own rounding of the scores.
    mask = _broadcast_bias(bias)
    return mask if q.device.type == "cpu" else mask.to(q.dtype)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, bias: torch.Tensor | None = None,
                   layout: Layout | None = None, return_lse: bool = False):
    """Full (non-causal) attention by ``F.scaled_dot_product_attention``; the ``sdpa`` backend's
    kernel. With ``return_lse``, ``attention_with_lse`` (SDPA's public call returns no lse).
    ``layout`` is not needed: every query sees every key."""
    if return_lse:
        return attention_with_lse(q, k, v, bias)
    # SDPA wants heads before tokens: (B, H, L, D)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=_score_mask(bias, q))
    return out.transpose(1, 2)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention ``sdpa_attention`` computes, and its log-sum-exp: q (B, Lq, H, D), k/v
    (B, Lk, H, D) -> (out (B, Lq, H, D) in q's dtype, lse (B, Lq, H) float32).

    lse = log sum_j exp(q.k_j / sqrt(D) + bias_j), what a ring of key blocks needs to merge
    partial outputs. Computed in float32 on blocks of ``LSE_QUERY_CHUNK`` queries, so the score
    matrix never holds more than one block."""
    scale = q.shape[-1] ** -0.5
    kt = k.float().permute(0, 2, 3, 1)  # (B, H, D, Lk)
    vh = v.float().transpose(1, 2)  # (B, H, Lk, D)
    mask = None if bias is None else _broadcast_bias(bias.float())
    outs, lses = [], []
    for start in range(0, q.shape[1], LSE_QUERY_CHUNK):
        qh = q[:, start:start + LSE_QUERY_CHUNK].float().transpose(1, 2)  # (B, H, c, D)
        scores = (qh @ kt) * scale  # (B, H, c, Lk)
        if mask is not None:
            scores = scores + mask
        lse = torch.logsumexp(scores, dim=-1)  # (B, H, c)
        outs.append(torch.exp(scores - lse[..., None]) @ vh)  # (B, H, c, D)
        lses.append(lse)
    out = torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)  # (B, Lq, H, D)
    return out, torch.cat(lses, dim=2).transpose(1, 2)  # (B, Lq, H)


SDPA = Backend(
    name="sdpa", fn=sdpa_attention,
    devices=frozenset({"cpu", "cuda", "mps", "xpu"}),
    dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64}),
    supports_bias=True, returns_lse=True, exact=True,
)



# -- flex_attention ------------------------------------------------------------------------------

# the compiled flex_attention (compiled once per process, on first use); on the CPU inductor
# lowers it only for inference without the log-sum-exp output, so it runs under no_grad
_FLEX: list = []


def _compiled_flex():
    if not _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _FLEX[0]


def flex_attention_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, bias: torch.Tensor | None = None,
                      layout: Layout | None = None, return_lse: bool = False):
    """Full attention by torch's compiled ``flex_attention``; a score bias as its ``score_mod``.
    The ``flex`` backend's kernel (it returns no log-sum-exp: ``attention`` completes a ring's
    call with ``attention_with_lse``)."""
    if return_lse:
        raise ValueError("attention backend 'flex' returns no log-sum-exp")
    score_mod = None if bias is None else _bias_score_mod(bias.float())
    with torch.no_grad():
        out = _compiled_flex()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod)
    return out.transpose(1, 2)


def _bias_score_mod(table: torch.Tensor):
    """flex_attention's score_mod adding a key bias: (Lk,) to every row, or (B, Lk) per row."""
    if table.ndim == 1:
        return lambda score, b, h, qi, ki: score + table[ki]
    return lambda score, b, h, qi, ki: score + table[b, ki]


def _flex_unavailable() -> str | None:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return "this torch has no torch.nn.attention.flex_attention (torch >= 2.5 does)"
    return None


FLEX = Backend(
    name="flex", fn=flex_attention_fn, devices=frozenset({"cpu", "cuda"}),
    dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
    supports_bias=True, returns_lse=False, exact=True, unavailable=_flex_unavailable,
)


# -- flash-attn and SageAttention (CUDA; imported when first used) -------------------------------

def _flash_module():
    """flash-attn 3's interface where installed, else flash-attn 2's; None without either."""
    import importlib

    for name in ("flash_attn_interface", "flash_attn"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def _cuda_unavailable(package: str, module) -> Callable[[], str | None]:
    def reason() -> str | None:
        if not torch.cuda.is_available():
            return "needs a CUDA device (torch sees none)"
        if module() is None:
            return f"needs the {package} package (not importable here)"
        return None
    return reason


def flash_attention_fn(q, k, v, *, bias=None, layout=None, return_lse=False):
    """flash-attn's kernel on (B, L, H, D) as it is; lse (B, L, H) float32 where asked."""
    if bias is not None:
        raise ValueError("attention backend 'flash' takes no score bias")
    module = _flash_module()
    result = module.flash_attn_func(q, k, v, **({"return_attn_probs": True} if return_lse else {}))
    if not return_lse:
        return result[0] if isinstance(result, tuple) else result
    out, lse = result[0], result[1]  # lse (B, H, L)
    return out, lse.float().transpose(1, 2)


def _sage_module():
    try:
        import sageattention
    except ImportError:
        return None
    return sageattention


def sage_attention_fn(q, k, v, *, bias=None, layout=None, return_lse=False):
    """SageAttention (INT8 QK, fp16/bf16 PV) on (B, L, H, D) ("NHD")."""
    if bias is not None or return_lse:
        raise ValueError("attention backend 'sage' takes no score bias and returns no log-sum-exp")
    return _sage_module().sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


HALF = frozenset({torch.float16, torch.bfloat16})
FLASH = Backend(name="flash", fn=flash_attention_fn, devices=frozenset({"cuda"}), dtypes=HALF, supports_bias=False,
                returns_lse=True, exact=True, max_head_dim=256, unavailable=_cuda_unavailable("flash-attn", _flash_module))
SAGE = Backend(name="sage", fn=sage_attention_fn, devices=frozenset({"cuda"}), dtypes=HALF, supports_bias=False,
               returns_lse=False, exact=False, max_head_dim=128, unavailable=_cuda_unavailable("sageattention", _sage_module))

# name -> backend; the one a context selects by name (``select_backend``)
BACKENDS: dict[str, Backend] = {b.name: b for b in (SDPA, FLEX, FLASH, SAGE)}
# names an engine takes besides the backends': "auto" (the fastest exact one present) and
# "sliding_tile" (sliding-tile windows over the default dense kernel)
ENGINE_CHOICES = ("auto", "sliding_tile")


def select_backend(name: str) -> Backend:
    """The registered backend ``name``; an unknown name is an error naming the allowed ones."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"attention backend: unknown {name!r} (allowed: {', '.join(sorted(BACKENDS))})") from None


def available_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    """The registered backends that can run attention in ``dtype`` on ``device`` in this process."""
    return [b.name for b in BACKENDS.values()
            if device.type in b.devices and dtype in b.dtypes and b.unavailable() is None]


def engine_backend(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The dense kernel an engine named ``name`` runs (``attention_backend``), checked before
    loading. ``auto``: flash-attn where it runs (CUDA, fp16/bf16), else ``sdpa`` (on a CPU SDPA's
    fused kernel measured faster than compiled ``flex``: see BENCHMARKS.md); ``sliding_tile``:
    ``sdpa`` inside each tile."""
    if name in ("auto", "sliding_tile"):
        return FLASH if name == "auto" and "flash" in available_backends(device, dtype) else SDPA
    backend = select_backend(name)
    backend.check_engine(device, dtype)
    return backend


class SequenceParallel(Protocol):
    """A scheme splitting the token sequence over processes (``parallel.sequence``). It holds no
    per-forward state: the sequence's length before padding is passed where it matters."""

    def shard(self, x: torch.Tensor, phasors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def span(self, length: int) -> tuple[int, int]: ...
    def shard_tokens(self, t: torch.Tensor) -> torch.Tensor: ...
    def gather(self, x: torch.Tensor, length: int) -> torch.Tensor: ...
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int,
                  local: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor: ...


# a sliding-tile window (frames, rows, columns) in tokens (``models.sliding_tile``)
Window = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class AttentionContext:
    """What attention runs with. ``sequence``: the sequence-parallel object (None: this process
    holds the whole sequence); ``backend``: the local kernel; ``window``: None (dense), or the
    sliding-tile window of 3-D self-attention (set per forward: a request's own)."""

    sequence: SequenceParallel | None = None
    backend: Backend = SDPA
    window: Window | None = None


_CONTEXT: contextvars.ContextVar[AttentionContext] = contextvars.ContextVar("attention_context",
                                                                            default=AttentionContext())


# Compiled code (``torch.compile``: ``models.compiled``) cannot read a ContextVar (dynamo breaks
# the graph at every ``get``); it reads this process-wide mirror of the innermost context entered
# instead, each distinct context interned so that dynamo's guard on it holds across forwards. The
# engine runs its forwards on one thread (the server's engine thread), where the two agree.
_MIRROR: list[AttentionContext] = [AttentionContext()]
_INTERNED: dict[AttentionContext, AttentionContext] = {}
_INTERN_LIMIT = 1024


def _interned(context: AttentionContext) -> AttentionContext:
    if len(_INTERNED) >= _INTERN_LIMIT:
        _INTERNED.clear()
    return _INTERNED.setdefault(context, context)


def current_context() -> AttentionContext:
    return _CONTEXT.get()


@contextlib.contextmanager
def attention_context(context: AttentionContext):
    """Make ``context`` the one attention runs with inside the block."""
    context = _interned(context)
    token = _CONTEXT.set(context)
    previous, _MIRROR[0] = _MIRROR[0], context
    try:
        yield context
    finally:
        _MIRROR[0] = previous
        _CONTEXT.reset(token)


@contextlib.contextmanager
def sequence_parallel(sp: SequenceParallel | None):
    """Make ``sp`` (e.g. ``parallel.sequence.UlyssesSequenceParallel``, or None) active inside the
    block, with the backend of the context around it."""
    with attention_context(dataclasses.replace(current_context(), sequence=sp)):
        yield sp


@contextlib.contextmanager
def sliding_window(window: Window | None):
    """Make ``window`` (None: dense) the sliding-tile window of 3-D self-attention inside the block."""
    with attention_context(dataclasses.replace(current_context(), window=window)):
        yield window


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kind: Literal["self", "cross"],
              bias: torch.Tensor | None = None, layout: Layout | None = None) -> torch.Tensor:
    """q: (B, Lq, H, D), k/v: (B, Lk, H, D) -> (B, Lq, H, D), by the context's backend.

    ``kind="self"``: the keys are the (possibly sharded) token sequence itself, laid out as
    ``layout`` (the whole sequence's token grid; sequence-parallel self-attention needs it for
    the length). ``kind="cross"``: the keys are a whole context. ``bias``: None, (Lk,) float32
    added to every query's scores (a context's, see ``collapse_repeated_tail``), or (B, Lk) per
    row. A backend that takes no bias hands a biased call to SDPA. With a sliding-tile window in
    the context, a self-attention over a 3-D grid attends tile by tile (``models.sliding_tile``).
    """
    if kind not in ("self", "cross"):
        raise ValueError(f"attention kind: expected 'self' or 'cross', got {kind!r}")
    context = _MIRROR[0] if torch.compiler.is_compiling() else _CONTEXT.get()
    backend = context.backend if bias is None or context.backend.supports_bias else SDPA
    backend.check(q)
    local = backend.fn if backend.returns_lse else _with_lse_fallback(backend.fn)
    if kind == "self" and context.window is not None and layout is not None and len(layout) == 3:
        from .sliding_tile import sliding_tile_attention

        local = functools.partial(sliding_tile_attention, window=context.window, dense=local)
    if kind == "self" and context.sequence is not None:
        if bias is not None:
            raise ValueError("a score bias is for a context's keys, not for sequence-parallel self-attention")
        if layout is None:
            raise ValueError("sequence-parallel self-attention needs layout (the token grid) for the sequence length")
        return context.sequence.attention(q, k, v, math.prod(layout), functools.partial(local, layout=layout))
    return local(q, k, v, bias=bias, layout=layout)


def _with_lse_fallback(fn):
    """A kernel without a log-sum-exp output, completed by ``attention_with_lse`` where one is asked."""
    def kernel(q, k, v, *, bias=None, layout=None, return_lse=False):
        if return_lse:
            return attention_with_lse(q, k, v, bias)
        return fn(q, k, v, bias=bias, layout=layout)
    return kernel


def collapse_repeated_tail(context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Context tokens (B, L, C) whose last m positions repeat one vector in every row -> the first
    L - m + 1 positions and a score bias (L - m + 1,) float32: 0, and log m on the last position.

    A prompt padded to a fixed length (Wan: 512 text tokens, zeros past the prompt) has this
    form. Attention over the shortened context with the bias equals attention over the whole:
    m equal keys get m equal scores, i.e. one key weighed m times; the values are equal too.
    Keys and values are computed from equal vectors per position, so they stay equal. Returns
    ``(context, None)`` when there is nothing to collapse (m < 2).
    """
    length = context.shape[1]
    same = (context == context[:, -1:]).all(dim=-1)  # (B, L): equal to the row's last vector
    m = int(same.flip(1).long().cumprod(dim=1).sum(dim=1).min()) if length else 0
    if m < 2:
        return context, None
    bias = torch.zeros(length - m + 1, dtype=torch.float32, device=context.device)
    bias[-1] = math.log(m)
    return context[:, : length - m + 1], bias


def shard_sequence(x: torch.Tensor, phasors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B, L, C) and their rotary phasors (L, D/2) -> this process's share."""
    sp = _CONTEXT.get().sequence
    return (x, phasors) if sp is None else sp.shard(x, phasors)


def shard_tokens(t: torch.Tensor) -> torch.Tensor:
    """Any per-token tensor (B, L, ...) -> this process's share, cut as ``shard_sequence`` cuts the tokens."""
    sp = _CONTEXT.get().sequence
    return t if sp is None else sp.shard_tokens(t)


def sequence_span(length: int) -> tuple[int, int]:
    """[start, stop) of this process's share of a ``length``-token sequence (stop may pass ``length``
    by the padding of the last share)."""
    sp = _CONTEXT.get().sequence
    return (0, length) if sp is None else sp.span(length)


def gather_sequence(x: torch.Tensor, length: int) -> torch.Tensor:
    """This process's share of a ``length``-token sequence -> the whole sequence (B, length, C)."""
    sp = _CONTEXT.get().sequence
    return x if sp is None else sp.gather(x, length)
