"""Regional compilation: each repeated transformer block compiled with ``torch.compile``
(inductor on CPU and CUDA), the rest of the model eager, as the peers do it. The blocks share one
compiled graph (their parameters are graph inputs), so compiling costs one block's compilation
whatever the depth, and a recompilation per new input form (a new token count makes that
dimension dynamic; the text keys' bias is None, per key or per row).

What it needed on torch 2.13 (``EngineConfig.compile``; measured, see BENCHMARKS.md):
- bf16 on a CPU with the fused oneDNN Linear + GELU (``layers.linear_gelu_tanh``): inductor's
  lowering of ``mkldnn._linear_pointwise`` asserts that the weight is a frozen constant
  ("LoweringException: AssertionError ... w.get_name() in V.graph.constants"); under compilation
  the plain Linear and GELU run instead, which inductor fuses itself.
- the attention context is a ContextVar, which dynamo cannot read (a graph break per attention
  call, and per-break recompilations); compiled code reads a mirror (``attention._MIRROR``).
- ``flex_attention`` compiles on the CPU only for inference without its log-sum-exp output.

Blocks with forward hooks (memory levels 2-3 stream and widen blocks through hooks) are not
compiled: ``compile_blocks`` refuses them.
"""

from __future__ import annotations

import torch

RECOMPILE_LIMIT = 32  # per code object: input forms (bias kinds, batch sizes, new lengths) of one engine


def compile_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """Compile ``model.blocks`` in place (parameter names unchanged); returns ``model``."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"compile: {type(model).__name__} has no repeated blocks to compile")
    for block in blocks:
        if block._forward_hooks or block._forward_pre_hooks:
            raise ValueError("compile: the blocks carry forward hooks (memory level 2-3 streaming or widening): "
                             "compile runs at low_mem_level 0 or 1")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in blocks:
        block.compile()
    model.compiled_blocks = True
    return model


def is_compiled(model: torch.nn.Module) -> bool:
    return getattr(model, "compiled_blocks", False)
