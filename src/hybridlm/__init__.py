"""hybridlm: build, run, trace and train hybrid Mamba-Attention Mixture-of-Experts language models."""

from hybridlm.accounting import cache_bytes, count_params, flops_per_token
from hybridlm.cache import HybridCache
from hybridlm.checkpoints import from_pretrained, load_tokenizer, save_pretrained
from hybridlm.config import (
    AttentionConfig,
    GatedDeltaNetConfig,
    HybridConfig,
    Mamba2Config,
    MLPConfig,
    MoEConfig,
)
from hybridlm.generation import generate, stream_generate
from hybridlm.model import HybridLM
from hybridlm.tokenizer import ByteTokenizer

__version__ = "0.1.0"

__all__ = [
    "AttentionConfig",
    "ByteTokenizer",
    "GatedDeltaNetConfig",
    "HybridCache",
    "HybridConfig",
    "HybridLM",
    "MLPConfig",
    "Mamba2Config",
    "MoEConfig",
    "cache_bytes",
    "count_params",
    "flops_per_token",
    "from_pretrained",
    "generate",
    "load_tokenizer",
    "save_pretrained",
    "stream_generate",
]
