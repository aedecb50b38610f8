"""What a config costs, computed from the config alone (no model is allocated).

Parameters (total and active per token, per block type), KV-cache and recurrent-state bytes for a
batch and context length, and FLOPs per generated token. ``tests/test_accounting.py`` checks the
parameter formulas against a real instantiation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hybridlm.config import BLOCK_TYPES, AttentionConfig, HybridConfig, layer_type_name


@dataclass
class BlockParams:
    total: int
    active: int


@dataclass
class ParamCount:
    total: int
    active: int  # per token, counting the input embedding and the LM head
    embedding: int
    lm_head: int  # 0 when tied to the embedding
    final_norm: int
    by_block_type: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> blocks/total/active

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
            "by_block_type": self.by_block_type,
        }


def _linear(fan_in: int, fan_out: int, bias: bool = False) -> int:
    return fan_in * fan_out + (fan_out if bias else 0)


def _mlp_params(hidden: int, intermediate: int, activation: str, bias: bool = False) -> int:
    num_proj = 3 if activation == "swiglu" else 2
    biases = (num_proj - 1) * intermediate + hidden if bias else 0
    return num_proj * hidden * intermediate + biases


def block_params(char: str, cfg: HybridConfig) -> BlockParams:
    """Parameters of one block (its pre-norm included); ``active`` differs from ``total`` only for MoE."""
    d = cfg.hidden_size
    norm = d
    if char == "M":
        m = cfg.mamba2
        n = _linear(d, m.intermediate_size + m.conv_dim + m.num_heads, m.use_bias)
        n += m.conv_dim * m.conv_kernel + (m.conv_dim if m.use_conv_bias else 0)
        n += 3 * m.num_heads + (m.intermediate_size if m.has_gated_norm else 0)  # dt_bias, A_log, D; gated norm
        n += _linear(m.intermediate_size, d, m.use_bias)
        return BlockParams(n + norm, n + norm)
    if char == "G":
        g = cfg.gdn
        n = d * (g.conv_dim + g.value_dim + 2 * g.num_value_heads)  # qkv, z, b, a projections
        n += g.conv_dim * g.conv_kernel + 2 * g.num_value_heads + g.value_head_dim
        n += g.value_dim * d
        return BlockParams(n + norm, n + norm)
    if char == "*":
        a = cfg.attention
        q_out = a.num_heads * a.head_dim * (2 if a.has_output_gate else 1)
        kv_out = a.num_kv_heads * a.head_dim
        n = _linear(d, q_out, a.bias) + 2 * _linear(d, kv_out, a.bias) + _linear(a.num_heads * a.head_dim, d, a.bias)
        n += 2 * a.head_dim if a.has_qk_norm else 0
        return BlockParams(n + norm, n + norm)
    if char == "P":
        both = block_params("M", cfg).total + block_params("*", cfg).total - norm
        return BlockParams(both, both)
    if char == "m":
        m = cfg.mamba
        inner = m.intermediate_size
        n = _linear(d, 2 * inner, m.use_bias) + inner * m.conv_kernel + (inner if m.use_conv_bias else 0)
        n += inner * (m.dt_rank + 2 * m.state_size) + (m.dt_rank + 2 * m.state_size if m.has_inner_norms else 0)
        n += _linear(m.dt_rank, inner, True) + inner * m.state_size + inner  # dt_proj, A_log, D
        n += _linear(inner, d, m.use_bias)
        return BlockParams(n + norm, n + norm)
    if char == "-":
        n = _mlp_params(d, cfg.mlp.intermediate_size, cfg.mlp.activation, cfg.mlp.bias)
        return BlockParams(n + norm, n + norm)
    if char == "E":
        e = cfg.moe
        router = e.num_experts * d + (e.num_experts if e.use_expert_bias else 0)
        per_expert = _mlp_params(d, e.intermediate_size, e.activation)
        shared = 0
        if e.num_shared_experts:
            shared = _mlp_params(d, e.num_shared_experts * e.shared_intermediate_size, e.activation)
            shared += d if e.has_shared_expert_gate else 0
        fixed = norm + router + shared
        return BlockParams(fixed + e.num_experts * per_expert, fixed + e.num_experts_per_tok * per_expert)
    raise ValueError(f"no block type for pattern character {char!r}")


def count_params(cfg: HybridConfig) -> ParamCount:
    """Total and active-per-token parameters of the model ``HybridLM(cfg)`` would build."""
    embedding = cfg.vocab_size * cfg.hidden_size
    lm_head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    total = active = embedding + lm_head + cfg.hidden_size
    by_type: dict[str, dict[str, int]] = {}
    for char in BLOCK_TYPES:
        num_blocks = cfg.pattern.count(char)
        if not num_blocks:
            continue
        block = block_params(char, cfg)
        by_type[layer_type_name(char)] = {
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

    KV and conv states are held in ``dtype``; SSM and DeltaNet recurrent states in fp32, as
    HybridLM.new_cache allocates them.
    """
    width = _dtype_bytes(dtype)
    kv = conv = recurrent = 0
    if cfg.attention is not None:
        num_attention = cfg.pattern.count("*") + cfg.pattern.count("P")
        kv = batch_size * context * kv_bytes_per_token(cfg.attention, num_attention, dtype)
    if cfg.mamba2 is not None:
        m, n = cfg.mamba2, cfg.pattern.count("M") + cfg.pattern.count("P")
        conv += n * batch_size * m.conv_dim * (m.conv_kernel - 1) * width
        recurrent += n * batch_size * m.num_heads * m.head_dim * m.state_size * 4
    if cfg.gdn is not None and "G" in cfg.pattern:
        g, n = cfg.gdn, cfg.pattern.count("G")
        conv += n * batch_size * g.conv_dim * (g.conv_kernel - 1) * width
        recurrent += n * batch_size * g.num_value_heads * g.key_head_dim * g.value_head_dim * 4
    if cfg.mamba is not None and "m" in cfg.pattern:
        m, n = cfg.mamba, cfg.pattern.count("m")
        conv += n * batch_size * m.intermediate_size * (m.conv_kernel - 1) * width
        recurrent += n * batch_size * m.intermediate_size * m.state_size * 4
    return CacheBytes(kv, conv, recurrent)


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
    params = count_params(cfg)
    matmul = 2 * params.active_without_embedding
    attention = 0
    if cfg.attention is not None:
        a = cfg.attention
        attention = (
            (cfg.pattern.count("*") + cfg.pattern.count("P")) * 4 * a.num_heads * a.head_dim * context
        )  # QK^T and PV
    return matmul + attention
