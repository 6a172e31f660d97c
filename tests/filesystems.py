"""Real small filesystems for the tests of full-disk and read-only behaviour: a tmpfs mounted for
the test (root, CAP_SYS_ADMIN; the test is skipped, with the reason, where mounting is refused)."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(root: Path, size_mb: int, read_only: bool = False):
    """``root`` (created) as a tmpfs of ``size_mb`` MB for the block; unmounted after it."""
    root.mkdir(parents=True, exist_ok=True)
    options = f"{'ro,' if read_only else ''}size={size_mb}m"
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(root)], capture_output=True).returncode:
        pytest.skip("mounting a small filesystem needs root (CAP_SYS_ADMIN)")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)])


def fill(root: Path) -> Path:
    """Write zeros under ``root`` until its filesystem is full; returns the file (delete it to free)."""
    filler = root / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    return filler
