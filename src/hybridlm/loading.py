"""Resolve what the CLI and library are pointed at: a preset name or a checkpoint directory."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from hybridlm.config import HybridConfig
from hybridlm.model import HybridLM
from hybridlm.presets import PRESETS, list_presets

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_config(name_or_path: str) -> HybridConfig:
    """A preset's config, or a checkpoint directory's config (weights are not read)."""
    if name_or_path in PRESETS:
        return HybridConfig.from_preset(name_or_path)
    path = Path(name_or_path)
    if path.is_dir():
        from hybridlm.checkpoints import read_config

        return read_config(path)
    raise ValueError(f"{name_or_path!r} is neither a preset ({', '.join(list_presets())}) nor a checkpoint directory")


def load_model(
    name_or_path: str, seed: int = 0, dtype: torch.dtype | None = None, device: str = "cpu", quiet: bool = False
) -> HybridLM:
    """A checkpoint directory's model, or a preset built with random weights from ``seed``."""
    if name_or_path in PRESETS:
        if not quiet:
            print(f"note: {name_or_path} is a preset: random weights (seed {seed})", file=sys.stderr)
        torch.manual_seed(seed)
        with torch.device(device):
            model = HybridLM(HybridConfig.from_preset(name_or_path))
        if dtype is not None:
            model = model.to(dtype)
        return model.eval()
    resolve_config(name_or_path)  # the clear error for a bad name
    from hybridlm.checkpoints import from_pretrained

    return from_pretrained(name_or_path, dtype=dtype, device=device)
