"""The process layout: ``world_size = cfg_degree x sp_size x tp_size`` ranks, rank =
(cfg_rank x sp_size + sp_rank) x tp_size + tp_rank: tensor-parallel ranks (an all-reduce per
layer) are the closest neighbours, then the sequence-parallel ones (whose Ulysses all-to-all is
among neighbours too: sp rank = ring index x Ulysses degree + Ulysses index), and each CFG half
is a contiguous block, so that on GPUs the heaviest traffic stays among neighbours."""

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
                 ring_size: int = 1, tp_size: int = 1) -> None:
    """Raise ValueError, naming the options, unless ``world_size == tp_size x sp_size x cfg_degree``,
    the ring degree divides sp_size and the attention heads divide among the tensor-parallel and
    Ulysses ranks (tp_size x sp_size / ring_size)."""
    cfg_degree = 2 if cfg_parallel else 1
    needed = tp_size * sp_size * cfg_degree
    if world_size != needed:
        tp = f"tp_size={tp_size} x " if tp_size > 1 else ""
        raise ValueError(
            f"{tp}sp_size={sp_size} x cfg degree {cfg_degree} (cfg_parallel={cfg_parallel}) needs "
            f"{needed} processes, but the world size is {world_size}: launch with "
            f"`torchrun --nproc-per-node {needed} -m vidloom generate ...` or "
            f"`vidloom generate --nproc {needed} ...`, or change {'tp_size / ' if tp_size > 1 else ''}sp_size / cfg_parallel"
        )
    if num_heads is not None and num_heads % tp_size:
        raise ValueError(f"tp_size={tp_size} must divide the transformer's {num_heads} attention heads (allowed: "
                         f"{', '.join(str(d) for d in range(1, num_heads + 1) if num_heads % d == 0)})")
    if num_heads is not None:
        num_heads //= tp_size  # each tensor-parallel rank's heads
    if sp_size % ring_size:
        raise ValueError(f"ring_size={ring_size} must divide sp_size={sp_size} "
                         f"(allowed: {', '.join(str(d) for d in range(1, sp_size + 1) if sp_size % d == 0)})")
    ulysses = sp_size // ring_size
    if num_heads is not None and num_heads % ulysses:
        rings = [r for r in range(1, sp_size + 1) if sp_size % r == 0 and num_heads % (sp_size // r) == 0]
        raise ValueError(f"sp_size={sp_size} with ring_size={ring_size} splits the transformer's {num_heads} attention "
                         f"heads{f' (per tensor-parallel rank)' if tp_size > 1 else ''} "
                         f"over {ulysses} Ulysses ranks, which must divide them (allowed ring_size for "
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
    tp_size: int = 1
    tp_group: object = None

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def sp_rank(self) -> int:
        return self.rank // self.tp_size % self.sp_size

    @property
    def cfg_rank(self) -> int:
        return self.rank // (self.sp_size * self.tp_size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def initialize(cls, sp_size: int, cfg_parallel: bool, device: torch.device,
                   timeout_s: float = 600.0, ring_size: int = 1, tp_size: int = 1) -> "ParallelState":
        """Join (or start) the default process group from the launcher's environment and build the
        tensor-parallel, sequence-parallel (Ulysses, ring) and CFG groups. NCCL on CUDA, gloo on CPU."""
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
        check_layout(sp_size, cfg_parallel, world, ring_size=ring_size, tp_size=tp_size)
        ulysses = sp_size // ring_size

        def at(c: int, s: int, t: int) -> int:
            return (c * sp_size + s) * tp_size + t

        def group_of(lists: list[list[int]]):
            """Every rank creates every group, in the same order (torch.distributed requires it);
            this rank keeps the one it belongs to."""
            mine = None
            for ranks in lists:
                group = dist.new_group(ranks)
                if rank in ranks:
                    mine = group
            return mine

        cells = [(c, t) for c in range(cfg_degree) for t in range(tp_size)]
        sp_group = group_of([[at(c, s, t) for s in range(sp_size)] for c, t in cells])
        cfg_group = group_of([[at(c, s, t) for c in range(cfg_degree)] for s in range(sp_size) for t in range(tp_size)])
        tp_group = group_of([[at(c, s, t) for t in range(tp_size)] for c in range(cfg_degree) for s in range(sp_size)]) \
            if tp_size > 1 else None
        state = cls(rank=rank, world_size=world, sp_size=sp_size, cfg_degree=cfg_degree, sp_group=sp_group,
                    cfg_group=cfg_group, ring_size=ring_size, tp_size=tp_size, tp_group=tp_group)
        if ring_size > 1:
            state.ulysses_group = group_of([[at(c, r * ulysses + u, t) for u in range(ulysses)]
                                            for c, t in cells for r in range(ring_size)])
            c, s, t = state.cfg_rank, state.sp_rank, state.tp_rank
            state.ring_ranks = tuple(at(c, r * ulysses + s % ulysses, t) for r in range(ring_size))
        return state


def close_process_groups() -> None:
    """Destroy the default process group and every group built on it, if there is one (idempotent)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """``cuda`` without an index means this process's GPU (LOCAL_RANK) under a launcher."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device
