"""How much memory is free where tensors would live: the one answer that model building and
generation both check their sizes against before they allocate."""

from __future__ import annotations

import ctypes
import math
import mmap
import os

import torch
from torch import Tensor, nn


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory where ``device``'s tensors live: CUDA's free bytes, the host's available RAM for
    the CPU; None where it cannot be asked (meta, mps, ...: then nothing is refused for size)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:  # Linux: MemAvailable counts reclaimable cache
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


HUGE_PAGE_BYTES = 2 * 1024 * 1024
_ALIGN_BYTES = 64  # a cache line


def huge_pages_available() -> bool:
    """Whether this host lets a process ask for transparent huge pages (Linux, THP not "never")."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as setting:
            return "[never]" not in setting.read()
    except OSError:
        return False


def empty_in_huge_pages(shapes: list[torch.Size], dtypes: list[torch.dtype]) -> list[Tensor] | None:
    """Uninitialised CPU tensors of these shapes and dtypes, side by side (each at a cache-line boundary) in
    one private anonymous mapping that asks for 2 MiB pages (madvise MADV_HUGEPAGE); None where the host
    has no huge pages. The mapping lives while any of them does.

    Why: a decode step streams every weight once, and with 4 KiB pages that is a TLB miss every 64 cache
    lines over ~100 matrices; in 2 MiB pages the qwen3_next benchmark model's step took 5% less at batch 1
    and 7% less at batch 8 (10.4 -> 9.9 ms, 21.6 -> 19.8 ms), while one 960 MiB GEMV pass reads at the same
    28.3 GB/s either way (the roofline's bandwidth is unchanged)."""
    if not shapes or not huge_pages_available():
        return None
    counts = [math.prod(shape) for shape in shapes]
    sizes = [-(-n * d.itemsize // _ALIGN_BYTES) * _ALIGN_BYTES for n, d in zip(counts, dtypes, strict=True)]
    # private: THP backs private anonymous memory; shared anonymous memory is shmem, which it may not
    try:
        arena = mmap.mmap(-1, sum(sizes) + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        arena.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # no address space for one mapping (a ulimit), or madvise refused: the allocator's pages
        return None
    offset = -ctypes.addressof(ctypes.c_char.from_buffer(arena)) % HUGE_PAGE_BYTES  # the first huge page
    tensors = []
    for shape, dtype, count, size in zip(shapes, dtypes, counts, sizes, strict=True):
        tensors.append(torch.frombuffer(arena, dtype=dtype, count=count, offset=offset).view(shape))
        offset += size
    return tensors


def wants_huge_pages(numel: int, dtype: torch.dtype) -> bool:
    """A tensor of at least one huge page (smaller ones stay where the allocator puts them)."""
    return numel * dtype.itemsize >= HUGE_PAGE_BYTES


def move_to_huge_pages(module: nn.Module) -> int:
    """Moves the module's contiguous CPU parameters of at least 2 MiB into memory from
    ``empty_in_huge_pages``, one at a time (one extra parameter resident while moving); returns the
    bytes moved (0 where the host has no huge pages). The values are unchanged."""
    chosen = [
        p
        for p in module.parameters()
        if p.device.type == "cpu" and p.is_contiguous() and wants_huge_pages(p.numel(), p.dtype)
    ]
    moved = empty_in_huge_pages([p.shape for p in chosen], [p.dtype for p in chosen])
    if moved is None:
        return 0
    with torch.no_grad():
        for parameter, destination in zip(chosen, moved, strict=True):
            parameter.data = destination.copy_(parameter)
    return sum(p.numel() * p.element_size() for p in chosen)
