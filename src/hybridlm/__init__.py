"""hybridlm: build, run, trace and train hybrid Mamba-Attention Mixture-of-Experts language models.

The names below are imported on first use (PEP 562), so ``import hybridlm.ops.ssd`` or the CLI's
``--version`` do not load torch, the layers and the checkpoint readers before they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "AttentionConfig": "hybridlm.config",
    "GatedDeltaNetConfig": "hybridlm.config",
    "HybridConfig": "hybridlm.config",
    "Mamba2Config": "hybridlm.config",
    "MambaConfig": "hybridlm.config",
    "MLPConfig": "hybridlm.config",
    "MoEConfig": "hybridlm.config",
    "BLOCKS": "hybridlm.blocks",
    "BlockSpec": "hybridlm.blocks",
    "get_preset": "hybridlm.presets",
    "cache_bytes": "hybridlm.accounting",
    "count_params": "hybridlm.accounting",
    "flops_per_token": "hybridlm.accounting",
    "HybridCache": "hybridlm.cache",
    "HybridLM": "hybridlm.model",
    "generate": "hybridlm.generation",
    "stream_generate": "hybridlm.generation",
    "from_pretrained": "hybridlm.checkpoints",
    "load_tokenizer": "hybridlm.checkpoints",
    "save_pretrained": "hybridlm.checkpoints",
    "ByteTokenizer": "hybridlm.tokenizer",
}

__all__ = [
    "BLOCKS",
    "AttentionConfig",
    "BlockSpec",
    "ByteTokenizer",
    "GatedDeltaNetConfig",
    "HybridCache",
    "HybridConfig",
    "HybridLM",
    "MLPConfig",
    "Mamba2Config",
    "MambaConfig",
    "MoEConfig",
    "cache_bytes",
    "count_params",
    "flops_per_token",
    "from_pretrained",
    "generate",
    "get_preset",
    "load_tokenizer",
    "save_pretrained",
    "stream_generate",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hybridlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from hybridlm.accounting import cache_bytes, count_params, flops_per_token
    from hybridlm.blocks import BLOCKS, BlockSpec
    from hybridlm.cache import HybridCache
    from hybridlm.checkpoints import from_pretrained, load_tokenizer, save_pretrained
    from hybridlm.config import (
        AttentionConfig,
        GatedDeltaNetConfig,
        HybridConfig,
        Mamba2Config,
        MambaConfig,
        MLPConfig,
        MoEConfig,
    )
    from hybridlm.generation import generate, stream_generate
    from hybridlm.model import HybridLM
    from hybridlm.presets import get_preset
    from hybridlm.tokenizer import ByteTokenizer
