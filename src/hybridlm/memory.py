"""How much memory is free where tensors would live: the one answer that model building and
generation both check their sizes against before they allocate."""

from __future__ import annotations

import os

import torch


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
