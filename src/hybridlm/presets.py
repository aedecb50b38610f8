"""Named configurations: debug models for tests and demos, and real families with published values.

Each real preset cites, in its ``source``, the published config.json its values come from.
``get_preset(name, **overrides)`` is the public entry point (also ``hybridlm.get_preset``). This module
imports config, never the other way round.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from hybridlm.config import (
    AttentionConfig,
    GatedDeltaNetConfig,
    HybridConfig,
    Mamba2Config,
    MambaConfig,
    MLPConfig,
    MoEConfig,
)


def debug_tiny() -> HybridConfig:
    """Every block type, ~0.3M parameters, a forward in milliseconds: for unit tests."""
    return HybridConfig(
        name="debug-tiny",
        vocab_size=256,
        hidden_size=64,
        pattern="MEGm*-EM",
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0),
        mamba2=Mamba2Config(num_heads=4, head_dim=16, state_size=16, num_groups=2, chunk_size=8),
        gdn=GatedDeltaNetConfig(num_key_heads=2, num_value_heads=4, key_head_dim=16, value_head_dim=16, chunk_size=8),
        mamba=MambaConfig(intermediate_size=128, state_size=8, dt_rank=4, chunk_size=8),
        mlp=MLPConfig(intermediate_size=128, activation="swiglu"),
        moe=MoEConfig(
            num_experts=8,
            num_experts_per_tok=2,
            intermediate_size=32,
            num_shared_experts=1,
            shared_intermediate_size=32,
        ),
        max_position_embeddings=2048,
    )


def debug_tiny_nemotron() -> HybridConfig:
    """debug-tiny's M/*/-/E blocks with Nemotron-H semantics, exportable to ``nemotron_h``."""
    return get_preset(
        "debug-tiny",
        name="debug-tiny-nemotron",
        pattern="M*ME-E",
        attention={"rope_theta": None},
        mamba2={"time_step_limit": (0.001, math.inf)},  # Nemotron-H clamps dt at time_step_min
        mlp={"activation": "relu2"},
        moe={"activation": "relu2", "scoring": "sigmoid", "use_expert_bias": True, "routed_scaling_factor": 2.5},
    )


def debug_tiny_qwen3_next() -> HybridConfig:
    """debug-tiny's G/*/E blocks with Qwen3-Next semantics, exportable to ``qwen3_next``."""
    return get_preset(
        "debug-tiny",
        name="debug-tiny-qwen3-next",
        pattern="GEGE*EGE",
        attention={"partial_rotary_factor": 0.25, "has_qk_norm": True, "has_output_gate": True},
        moe={"has_shared_expert_gate": True},
        norm_eps=1e-6,
        is_norm_zero_centered=True,
    )


def debug_small() -> HybridConfig:
    """~100M parameters (~20M active), a Nemotron-H-style pattern: for benchmarks and demos."""
    return HybridConfig(
        name="debug-small",
        vocab_size=256,
        hidden_size=512,
        pattern="MEMEM*EMEMEM*EME",
        attention=AttentionConfig(num_heads=8, num_kv_heads=2, head_dim=64, rope_theta=None),
        mamba2=Mamba2Config(num_heads=16, head_dim=64, state_size=64, num_groups=2, chunk_size=64),
        moe=MoEConfig(
            num_experts=16,
            num_experts_per_tok=2,
            intermediate_size=704,
            activation="relu2",
            scoring="sigmoid",
            use_expert_bias=True,
            routed_scaling_factor=2.5,
            num_shared_experts=1,
            shared_intermediate_size=1024,
        ),
        max_position_embeddings=8192,
    )


def nemotron_3_nano_30b_a3b() -> HybridConfig:
    return HybridConfig(
        name="nemotron-3-nano-30b-a3b",
        source=("huggingface.co/nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 config.json (model_type nemotron_h)"),
        vocab_size=131072,
        hidden_size=2688,
        pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
        attention=AttentionConfig(num_heads=32, num_kv_heads=2, head_dim=128, rope_theta=None),
        mamba2=Mamba2Config(
            num_heads=64,
            head_dim=64,
            state_size=128,
            num_groups=8,
            conv_kernel=4,
            chunk_size=128,
            use_conv_bias=True,
            time_step_min=0.001,
            time_step_max=0.1,
            time_step_floor=1e-4,
        ),
        moe=MoEConfig(
            num_experts=128,
            num_experts_per_tok=6,
            intermediate_size=1856,
            activation="relu2",
            scoring="sigmoid",
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            use_expert_bias=True,
            num_groups=1,
            topk_groups=1,
            num_shared_experts=1,
            shared_intermediate_size=3712,
        ),
        norm_eps=1e-5,
        tie_word_embeddings=False,
        max_position_embeddings=262144,  # the model card's 262K-token context (no RoPE: a limit, not a table)
        num_hidden_layers=52,
    )


def _qwen_next_style(
    name: str, source: str, num_layers: int, vocab_size: int, num_experts: int, top_k: int
) -> HybridConfig:
    """Qwen3-Next / Qwen3.5 text model: every 4th layer full attention, every layer an MoE FFN."""
    layer = "GE" * 3 + "*E"
    return HybridConfig(
        name=name,
        source=source,
        vocab_size=vocab_size,
        hidden_size=2048,
        pattern=layer * (num_layers // 4),
        attention=AttentionConfig(
            num_heads=16,
            num_kv_heads=2,
            head_dim=256,
            rope_theta=10_000_000.0,
            partial_rotary_factor=0.25,
            has_qk_norm=True,
            has_output_gate=True,
        ),
        gdn=GatedDeltaNetConfig(
            num_key_heads=16, num_value_heads=32, key_head_dim=128, value_head_dim=128, conv_kernel=4
        ),
        moe=MoEConfig(
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            intermediate_size=512,
            activation="swiglu",
            scoring="softmax",
            norm_topk_prob=True,
            num_shared_experts=1,
            shared_intermediate_size=512,
            has_shared_expert_gate=True,
        ),
        norm_eps=1e-6,
        is_norm_zero_centered=True,
        tie_word_embeddings=False,
        max_position_embeddings=262144,
        num_hidden_layers=num_layers,
    )


def qwen3_next_80b_a3b() -> HybridConfig:
    return _qwen_next_style(
        "qwen3-next-80b-a3b",
        "huggingface.co/Qwen/Qwen3-Next-80B-A3B-Instruct config.json (model_type qwen3_next)",
        num_layers=48,
        vocab_size=151936,
        num_experts=512,
        top_k=10,
    )


def qwen3_5_35b_a3b() -> HybridConfig:
    return _qwen_next_style(
        "qwen3.5-35b-a3b",
        "huggingface.co/Qwen/Qwen3.5-35B-A3B config.json, text_config (model_type qwen3_5_moe)",
        num_layers=40,
        vocab_size=248320,
        num_experts=256,
        top_k=8,
    )


PRESETS: dict[str, Callable[[], HybridConfig]] = {
    "debug-tiny": debug_tiny,
    "debug-tiny-nemotron": debug_tiny_nemotron,
    "debug-tiny-qwen3-next": debug_tiny_qwen3_next,
    "debug-small": debug_small,
    "nemotron-3-nano-30b-a3b": nemotron_3_nano_30b_a3b,
    "qwen3-next-80b-a3b": qwen3_next_80b_a3b,
    "qwen3.5-35b-a3b": qwen3_5_35b_a3b,
}


def list_presets() -> list[str]:
    return sorted(PRESETS)


def get_preset(preset: str, /, **overrides: Any) -> HybridConfig:
    """The named config, with top-level fields (and sub-configs, as dicts of fields) overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(list_presets())}")
    config = PRESETS[preset]()
    if not overrides:
        return config
    fields = {f.name for f in dataclasses.fields(HybridConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown HybridConfig field(s) in overrides: {', '.join(unknown)}")
    for key, value in list(overrides.items()):
        current = getattr(config, key)
        if isinstance(value, dict) and dataclasses.is_dataclass(current):
            # merge into the preset's sub-config; the merged dict goes through the same checks as JSON
            overrides[key] = {**dataclasses.asdict(current), **value}
    return dataclasses.replace(config, **overrides)
