"""Multi-process generation on ``torch.distributed``: the process layout (``state``), Ulysses
sequence parallelism (``sequence``), CFG parallelism (``cfg``) and parallel VAE decode (``vae``).

Models stay free of distributed code: the DiT calls ``models.attention`` hooks that are
identities unless a sequence-parallel context is active, and the pipeline's stages receive the
parallel objects from outside.
"""

from .state import ParallelState, check_layout, world_size_from_env

__all__ = ["ParallelState", "check_layout", "world_size_from_env"]
