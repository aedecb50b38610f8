"""Model configuration: the layer pattern and one sub-config per block type.

A hybrid model is a stack of pre-norm residual blocks, one character each (the Nemotron-H
convention, see DESIGN.md):

    M  Mamba-2 mixer          G  Gated DeltaNet mixer      *  GQA attention
    -  dense MLP              E  Mixture-of-Experts FFN    m  Mamba-1 mixer (Jamba)
    P  Mamba-2 and attention in parallel on one normalised input, summed (Falcon-H1)

Qwen3-Next's "linear attention + MoE" layer is the two blocks ``GE``; its "full attention + MoE"
layer is ``*E``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hybridlm.blocks import BLOCKS, layer_type_name


@dataclass
class AttentionConfig:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float | None = 10000.0  # None: no positional encoding in the block (Nemotron-H)
    partial_rotary_factor: float = 1.0  # fraction of head_dim that rotates (Qwen3-Next: 0.25)
    has_qk_norm: bool = False  # RMSNorm over head_dim on queries and keys (Qwen3)
    has_output_gate: bool = False  # sigmoid gate on the attention output (Qwen3-Next)
    bias: bool = False
    softmax_scale: float | None = None  # None: head_dim ** -0.5

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor) if self.rope_theta is not None else 0


@dataclass
class Mamba2Config:
    num_heads: int
    head_dim: int
    state_size: int
    num_groups: int = 1
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    use_bias: bool = False  # in_proj / out_proj bias
    norm_before_gate: bool = False  # False: y = norm(y * silu(z)) (Mamba-2, Nemotron-H)
    has_gated_norm: bool = True  # False: y * silu(z) without a norm (some Falcon-H1 models)
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: tuple[float, float] = (0.0, math.inf)

    @property
    def intermediate_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.intermediate_size + 2 * self.num_groups * self.state_size


@dataclass
class MambaConfig:
    """Mamba-1 selective SSM (Gu & Dao 2023) as Jamba uses it: per-channel A, x_proj / dt_proj."""

    intermediate_size: int
    state_size: int = 16
    conv_kernel: int = 4
    dt_rank: int = 16
    use_conv_bias: bool = True
    use_bias: bool = False  # in_proj / out_proj bias
    has_inner_norms: bool = True  # RMSNorm on dt, B and C after x_proj (Jamba)
    chunk_size: int = 16  # the chunked scan holds [B, L, L, I, N] per chunk: keep L small


@dataclass
class GatedDeltaNetConfig:
    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int = 4
    chunk_size: int = 64

    @property
    def key_dim(self) -> int:
        return self.num_key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.num_value_heads * self.value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim


Activation = Literal["swiglu", "relu2"]


@dataclass
class MLPConfig:
    intermediate_size: int
    activation: Activation = "swiglu"
    bias: bool = False


@dataclass
class MoEConfig:
    num_experts: int
    num_experts_per_tok: int
    intermediate_size: int
    activation: Activation = "swiglu"
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    use_expert_bias: bool = False  # bias added to scores only to choose experts (DeepSeek-V3)
    num_groups: int = 1  # grouped top-k: keep the best topk_groups of num_groups expert groups
    topk_groups: int = 1
    num_shared_experts: int = 0
    shared_intermediate_size: int = 0  # per shared expert
    has_shared_expert_gate: bool = False  # sigmoid(Linear(hidden, 1)) on the shared output (Qwen)
    aux_loss_coef: float = 0.01  # load-balancing loss (Switch Transformer, eq. 4)
    z_loss_coef: float = 0.0  # router z-loss (ST-MoE, eq. 5)


_SUB_CONFIGS: dict[str, type] = {
    "attention": AttentionConfig,
    "mamba2": Mamba2Config,
    "gdn": GatedDeltaNetConfig,
    "mlp": MLPConfig,
    "moe": MoEConfig,
    "mamba": MambaConfig,
}


@dataclass
class HybridConfig:
    vocab_size: int
    hidden_size: int
    pattern: str
    attention: AttentionConfig | None = None
    mamba2: Mamba2Config | None = None
    gdn: GatedDeltaNetConfig | None = None
    mlp: MLPConfig | None = None
    moe: MoEConfig | None = None
    mamba: MambaConfig | None = None
    norm_eps: float = 1e-5
    is_norm_zero_centered: bool = False  # RMSNorm scales by (1 + weight) (Qwen3-Next)
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    embedding_multiplier: float = 1.0  # Granite 4.0-H
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0  # logits are divided by this
    num_hidden_layers: int | None = None  # the family's own layer count, when it differs from len(pattern)
    name: str = ""
    source: str = ""  # where the values come from (a published config.json)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, cls in _SUB_CONFIGS.items():
            value = getattr(self, key)
            if isinstance(value, dict):
                if "time_step_limit" in value:
                    value = {**value, "time_step_limit": tuple(value["time_step_limit"])}
                setattr(self, key, cls(**value))
        self.validate()

    # -- validation ------------------------------------------------------------------------------
    def validate(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"pattern is empty: give one character per block, from {''.join(BLOCKS)!r}")
        for index, char in enumerate(self.pattern):
            if char not in BLOCKS:
                raise ValueError(
                    f"pattern[{index}] = {char!r} is not a block type; expected one of "
                    f"{', '.join(repr(c) for c in BLOCKS)} in pattern {self.pattern!r}"
                )
            for sub_config in BLOCKS[char].sub_configs:
                if getattr(self, sub_config) is None:
                    raise ValueError(
                        f"pattern[{index}] = {char!r} ({layer_type_name(char)}) needs the "
                        f"'{sub_config}' sub-config, which this config lacks"
                    )
        for name in ("vocab_size", "hidden_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.attention is not None:
            a = self.attention
            if a.num_heads % a.num_kv_heads:
                raise ValueError(
                    f"attention.num_heads ({a.num_heads}) must be a multiple of "
                    f"attention.num_kv_heads ({a.num_kv_heads})"
                )
            if a.rotary_dim % 2:
                raise ValueError(f"attention rotary dim {a.rotary_dim} must be even")
        if self.mamba2 is not None and self.mamba2.num_heads % self.mamba2.num_groups:
            raise ValueError(
                f"mamba2.num_heads ({self.mamba2.num_heads}) must be a multiple of "
                f"mamba2.num_groups ({self.mamba2.num_groups})"
            )
        if self.gdn is not None and self.gdn.num_value_heads % self.gdn.num_key_heads:
            raise ValueError(
                f"gdn.num_value_heads ({self.gdn.num_value_heads}) must be a multiple of "
                f"gdn.num_key_heads ({self.gdn.num_key_heads})"
            )
        if self.moe is not None:
            m = self.moe
            if not 0 < m.num_experts_per_tok <= m.num_experts:
                raise ValueError(
                    f"moe.num_experts_per_tok ({m.num_experts_per_tok}) must be in 1..num_experts ({m.num_experts})"
                )
            if m.num_experts % m.num_groups or not 0 < m.topk_groups <= m.num_groups:
                raise ValueError(
                    f"moe.num_groups ({m.num_groups}) must divide num_experts ({m.num_experts}) and "
                    f"topk_groups ({m.topk_groups}) must be in 1..num_groups"
                )

    # -- views -----------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.pattern)

    def block_counts(self) -> dict[str, int]:
        """Blocks per layer type name, in pattern-grammar order: {'mamba2': 23, 'moe': 23, ...}."""
        return {layer_type_name(c): self.pattern.count(c) for c in BLOCKS if c in self.pattern}

    # -- constructors and serialisation ------------------------------------------------------------
    @classmethod
    def from_preset(cls, preset: str, /, **overrides: Any) -> HybridConfig:
        from hybridlm.presets import get_preset

        return get_preset(preset, **overrides)

    def replace(self, **overrides: Any) -> HybridConfig:
        """A copy with top-level fields replaced (sub-configs may be given as dicts)."""
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        def encode(value: Any) -> Any:
            if isinstance(value, float) and math.isinf(value):
                return "inf" if value > 0 else "-inf"
            if isinstance(value, (list, tuple)):
                return [encode(v) for v in value]
            if isinstance(value, dict):
                return {k: encode(v) for k, v in value.items()}
            return value

        return json.dumps(encode(self.to_dict()), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HybridConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown HybridConfig field(s): {', '.join(unknown)}")
        data = dict(data)
        for key, sub_cls in _SUB_CONFIGS.items():
            sub = data.get(key)
            if isinstance(sub, dict):
                sub_known = {f.name for f in dataclasses.fields(sub_cls)}
                bad = sorted(set(sub) - sub_known)
                if bad:
                    raise ValueError(f"unknown field(s) in '{key}' sub-config: {', '.join(bad)}")
                sub = {k: _decode_float(v) for k, v in sub.items()}
                if "time_step_limit" in sub:
                    sub["time_step_limit"] = tuple(_decode_float(v) for v in sub["time_step_limit"])
                data[key] = sub_cls(**sub)
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> HybridConfig:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> HybridConfig:
        return cls.from_json(Path(path).read_text())


def _decode_float(value: Any) -> Any:
    if value == "inf":
        return math.inf
    if value == "-inf":
        return -math.inf
    return value
