"""The process layout: ``world_size = cfg_degree x sp_size`` ranks, each CFG half a contiguous
block of ``sp_size`` ranks (rank = cfg_rank * sp_size + sp_rank), so that on GPUs the
all-to-all of sequence parallelism stays among neighbours."""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def world_size_from_env() -> int:
    """The world size a launcher (torchrun, ``vidloom generate --nproc``) gave this process; 1 if none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_layout(sp_size: int, cfg_parallel: bool, world_size: int, num_heads: int | None = None,
                 ring_size: int = 1) -> None:
    """Raise ValueError, naming the options, unless ``world_size == sp_size x cfg_degree``, the ring
    degree divides sp_size and the attention heads divide among the Ulysses ranks
    (sp_size / ring_size)."""
    cfg_degree = 2 if cfg_parallel else 1
    if world_size != sp_size * cfg_degree:
        raise ValueError(
            f"sp_size={sp_size} x cfg degree {cfg_degree} (cfg_parallel={cfg_parallel}) needs "
            f"{sp_size * cfg_degree} processes, but the world size is {world_size}: launch with "
            f"`torchrun --nproc-per-node {sp_size * cfg_degree} -m vidloom generate ...` or "
            f"`vidloom generate --nproc {sp_size * cfg_degree} ...`, or change sp_size / cfg_parallel"
        )
    if sp_size % ring_size:
        raise ValueError(f"ring_size={ring_size} must divide sp_size={sp_size} "
                         f"(allowed: {', '.join(str(d) for d in range(1, sp_size + 1) if sp_size % d == 0)})")
    ulysses = sp_size // ring_size
    if num_heads is not None and num_heads % ulysses:
        rings = [r for r in range(1, sp_size + 1) if sp_size % r == 0 and num_heads % (sp_size // r) == 0]
        raise ValueError(f"sp_size={sp_size} with ring_size={ring_size} splits the transformer's {num_heads} attention "
                         f"heads over {ulysses} Ulysses ranks, which must divide them (allowed ring_size for "
                         f"sp_size={sp_size}: {', '.join(map(str, rings))}; ring attention works for any head count)")


@dataclass
class ParallelState:
    """This process's place in the layout and its process groups."""

    rank: int
    world_size: int
    sp_size: int
    cfg_degree: int
    sp_group: object
    cfg_group: object
    ring_size: int = 1  # ring degree inside the sequence-parallel group (Ulysses degree: sp_size / ring_size)
    ulysses_group: object = None  # the sp_size / ring_size neighbouring ranks of this rank's all-to-all
    ring_ranks: tuple[int, ...] = ()  # the global ranks of this rank's ring, in ring order

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    @property
    def cfg_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def initialize(cls, sp_size: int, cfg_parallel: bool, device: torch.device,
                   timeout_s: float = 600.0, ring_size: int = 1) -> "ParallelState":
        """Join (or start) the default process group from the launcher's environment and build the
        sequence-parallel and CFG groups. NCCL on CUDA, gloo on CPU."""
        if device.type == "cuda":
            # this rank's GPU becomes the current one: NCCL's collectives and every CUDA query
            # would otherwise open a context on GPU 0 in every rank
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
            # the groups this process started are torn down before the interpreter exits: left to
            # static destruction, gloo's worker threads can be destroyed still joinable, and the
            # process aborts ("terminate called without an active exception") after its work is done
            atexit.register(close_process_groups)
        world, rank = dist.get_world_size(), dist.get_rank()
        cfg_degree = 2 if cfg_parallel else 1
        check_layout(sp_size, cfg_parallel, world, ring_size=ring_size)
        # every rank creates every group, in the same order (torch.distributed requires it)
        sp_groups = [dist.new_group(list(range(c * sp_size, (c + 1) * sp_size))) for c in range(cfg_degree)]
        cfg_groups = [dist.new_group(list(range(s, world, sp_size))) for s in range(sp_size)]
        ulysses, ulysses_group, ring_ranks = sp_size // ring_size, None, ()
        if ring_size > 1:  # sp rank = ring index x ulysses + ulysses index
            for c in range(cfg_degree):
                base = c * sp_size
                for r in range(ring_size):
                    group = dist.new_group([base + r * ulysses + u for u in range(ulysses)])
                    if rank // ulysses == (base // ulysses) + r:
                        ulysses_group = group
            sp_rank = rank % sp_size
            ring_ranks = tuple(rank - sp_rank + r * ulysses + sp_rank % ulysses for r in range(ring_size))
        return cls(rank=rank, world_size=world, sp_size=sp_size, cfg_degree=cfg_degree,
                   sp_group=sp_groups[rank // sp_size], cfg_group=cfg_groups[rank % sp_size],
                   ring_size=ring_size, ulysses_group=ulysses_group, ring_ranks=ring_ranks)


def close_process_groups() -> None:
    """Destroy the default process group and every group built on it, if there is one (idempotent)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """``cuda`` without an index means this process's GPU (LOCAL_RANK) under a launcher."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device
