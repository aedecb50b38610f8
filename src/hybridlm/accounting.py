"""What a config costs, computed from the config alone (no model is allocated).

Parameters (total and active per token, per block type), KV-cache and recurrent-state bytes for a
batch and context length, and FLOPs per generated token. ``tests/test_accounting.py`` checks the
parameter formulas against a real instantiation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hybridlm.blocks import BLOCKS, block_spec
from hybridlm.config import AttentionConfig, HybridConfig
from hybridlm.layers.base import BlockParams


@dataclass
class ParamCount:
    total: int
    active: int  # per token, counting the input embedding and the LM head
    embedding: int
    lm_head: int  # 0 when tied to the embedding
    final_norm: int
    by_layer_type: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> blocks/total/active

    @property
    def active_without_embedding(self) -> int:
        """The convention of NVIDIA's "A3B" figures: LM head counted, input embedding not."""
        return self.active - self.embedding

    @property
    def active_without_embedding_and_head(self) -> int:
        return self.active - self.embedding - self.lm_head

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "active": self.active,
            "active_without_embedding": self.active_without_embedding,
            "active_without_embedding_and_head": self.active_without_embedding_and_head,
            "embedding": self.embedding,
            "lm_head": self.lm_head,
            "by_layer_type": self.by_layer_type,
        }


def block_params(char: str, cfg: HybridConfig) -> BlockParams:
    """Parameters of one block, its pre-norm included; ``active`` differs from ``total`` only for MoE."""
    module = block_spec(char).module.count_params(cfg)
    norm = cfg.hidden_size
    return BlockParams(module.total + norm, module.active + norm)


def count_params(cfg: HybridConfig) -> ParamCount:
    """Total and active-per-token parameters of the model ``HybridLM(cfg)`` would build."""
    embedding = cfg.vocab_size * cfg.hidden_size
    lm_head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    total = active = embedding + lm_head + cfg.hidden_size
    by_type: dict[str, dict[str, int]] = {}
    for char, spec in BLOCKS.items():
        num_blocks = cfg.pattern.count(char)
        if not num_blocks:
            continue
        block = block_params(char, cfg)
        by_type[spec.layer_type] = {
            "blocks": num_blocks,
            "total": num_blocks * block.total,
            "active": num_blocks * block.active,
            "per_block_total": block.total,
            "per_block_active": block.active,
        }
        total += num_blocks * block.total
        active += num_blocks * block.active
    return ParamCount(total, active, embedding, lm_head, cfg.hidden_size, by_type)


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class CacheBytes:
    kv: int
    conv: int
    recurrent: int

    @property
    def total(self) -> int:
        return self.kv + self.conv + self.recurrent

    def to_dict(self) -> dict[str, int]:
        return {"kv": self.kv, "conv": self.conv, "recurrent": self.recurrent, "total": self.total}


def kv_bytes_per_token(attention: AttentionConfig, num_blocks: int, dtype: torch.dtype) -> int:
    return num_blocks * 2 * attention.num_kv_heads * attention.head_dim * _dtype_bytes(dtype)


def cache_bytes(cfg: HybridConfig, batch_size: int, context: int, dtype: torch.dtype = torch.bfloat16) -> CacheBytes:
    """Bytes of the HybridCache for ``batch_size`` sequences of ``context`` tokens.

    KV and conv states are held in ``dtype``; SSM and DeltaNet recurrent states in fp32 (at least),
    exactly the tensors ``HybridLM.new_cache`` allocates: both read the blocks' ``state_tensors``.
    """
    by_kind = {"kv": 0, "conv": 0, "recurrent": 0}
    for char in cfg.pattern:
        for tensor in block_spec(char).module.state_tensors(cfg, batch_size, context):
            by_kind[tensor.kind] += tensor.nbytes(dtype)
    return CacheBytes(**by_kind)


def pure_attention_kv_bytes(
    cfg: HybridConfig, batch_size: int, context: int, dtype: torch.dtype = torch.bfloat16
) -> int:
    """KV bytes of a transformer of the same depth and width: attention in every layer.

    Depth is the family's own layer count (``num_hidden_layers``; 52 for Nemotron 3 Nano, 48 for
    Qwen3-Next), else the number of blocks. The attention shape is the config's own, or, for a
    model without attention, multi-head attention with 128-dim heads.
    """
    depth = cfg.num_hidden_layers or cfg.num_blocks
    attention = cfg.attention or AttentionConfig(
        num_heads=max(1, cfg.hidden_size // 128), num_kv_heads=max(1, cfg.hidden_size // 128), head_dim=128
    )
    return batch_size * context * kv_bytes_per_token(attention, depth, dtype)


def flops_per_token(cfg: HybridConfig, context: int) -> int:
    """Forward FLOPs to generate one token at ``context``: 2 x active matmul parameters + attention scores."""
    matmul = 2 * count_params(cfg).active_without_embedding
    return matmul + sum(block_spec(char).module.context_flops(cfg, context) for char in cfg.pattern)
