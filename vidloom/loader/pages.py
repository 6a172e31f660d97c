"""Releasing the pages of mapped weights: after a block of a mapped model ran, its parameters'
pages are dropped from the process (``madvise(MADV_DONTNEED)``); the next use reads them again
from the file (from the page cache where the kernel kept them). Only tensors that are views of a
file mapping the loader made are released (``mapped``): dropping the pages of the process's own
memory would zero it. The mappings are private and never written (copy-on-write would make a
written page the process's own)."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys

import torch

MADV_DONTNEED = 4
PAGE = mmap.PAGESIZE
_libc = None


def _madvise():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return _libc.madvise


def release_pages(tensor: torch.Tensor) -> int:
    """Drop the whole pages ``tensor`` (a view of a mapped file, on the CPU) covers from this
    process; returns the bytes released (0 where nothing could be: not Linux, not whole pages)."""
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" or tensor.numel() == 0:
        return 0
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // PAGE) * PAGE, end // PAGE * PAGE
    if last <= first:
        return 0
    if _madvise()(first, last - first, MADV_DONTNEED) != 0:
        return 0
    return last - first


def mapped(tensor: torch.Tensor, storages: set[int]) -> bool:
    """Whether ``tensor`` is a view of one of the file mappings whose storages' addresses are
    ``storages`` (a model's ``mapped_storages``, recorded by the loader)."""
    return tensor.device.type == "cpu" and tensor.untyped_storage().data_ptr() in storages
