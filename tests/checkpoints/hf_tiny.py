"""Tiny random transformers models of the six hybrid families hybridlm reads and writes.

Builders for parity tests (marker ``hf``): each returns a seeded, float32, ``.eval()`` transformers
``*ForCausalLM`` small enough to build and run in well under a second, with every block type of its
family present. The porting spec these models exercise is ``docs/hf-families.md``.

What makes them useful as a spec rather than a smoke test:

- every 1-D parameter and 1-D float buffer saved in the state dict (norm weights, ``D``, ``dt_bias``,
  ``A_log``, conv biases, ``e_score_correction_bias``) and Jamba's 2-D ``A_log`` is moved away from its
  init by ``0.1 * randn``, so a port that drops a norm weight, uses ``weight * x`` where the family
  uses ``(1 + weight) * x``, or ignores the router bias shows up in the logits;
- ``initializer_range`` is 0.1 instead of 0.02 so every block changes the residual stream visibly
  and routers pick experts by clear margins (fp32 round-off never flips a top-k choice);
- Mamba ``chunk_size`` is 8, so a 20-token prompt crosses chunk boundaries;
- head dims differ from ``hidden_size / num_heads`` wherever the family allows it (real checkpoints
  do this: Nemotron 3 Nano, Qwen3-Next, Falcon-H1), expert counts are 4-8 with top-2, and every
  multiplier of Granite and Falcon-H1 is set to a value other than 1.

Every builder takes ``**overrides`` that replace config fields, for variants
(``build_nemotron_h(n_group=1, moe_latent_size=16)``, ``build_falcon_h1(mamba_rms_norm=False)``).
Building leaves the global torch RNG untouched.

This module holds no tests; import it from a test next to it (pytest puts this folder on
``sys.path``): ``from hf_tiny import FAMILIES, save_tiny``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

# the hf extra is optional: without transformers every test module importing this one is skipped
transformers = pytest.importorskip("transformers")

__all__ = [
    "FAMILIES",
    "build_falcon_h1",
    "build_granitemoehybrid",
    "build_jamba",
    "build_nemotron_h",
    "build_qwen3_5_moe",
    "build_qwen3_next",
    "perturb_vectors",
    "save_tiny",
]

VOCAB_SIZE = 256
HIDDEN_SIZE = 64
INITIALIZER_RANGE = 0.1
PERTURB_SCALE = 0.1


def _build(model_class: type, config: transformers.PreTrainedConfig, seed: int) -> torch.nn.Module:
    """Construct, perturb and freeze a model without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model = model.to(torch.float32).eval()
    perturb_vectors(model, seed=seed + 1)
    return model


@torch.no_grad()
def perturb_vectors(model: torch.nn.Module, seed: int, scale: float = PERTURB_SCALE) -> list[str]:
    """Add ``scale * randn`` to every saved 1-D float tensor (and any ``A_log``); return their names.

    Non-persistent buffers (RoPE ``inv_freq``, Falcon-H1 ``mup_vector``) are derived from the config
    and are left alone.
    """
    generator = torch.Generator().manual_seed(seed)
    saved = set(model.state_dict().keys())
    perturbed = []
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in tensors:
        if name not in saved or not tensor.is_floating_point():
            continue
        if tensor.ndim == 1 or name.endswith("A_log"):
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
            tensor.add_(scale * noise.to(tensor.dtype))
            perturbed.append(name)
    return perturbed


def save_tiny(model: transformers.PreTrainedModel, path: str | Path) -> Path:
    """Write ``model`` as a Hugging Face checkpoint directory (config.json + model.safetensors)."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    return path


def build_nemotron_h(seed: int = 0, **overrides: Any) -> transformers.NemotronHForCausalLM:
    """Nemotron-H / Nemotron 3: pattern ``M*ME-E`` (Mamba-2, attention, Mamba-2, MoE, MLP, MoE).

    Head dim 24 != 64 / 4; Mamba intermediate = 8 heads x 12 = 96 != expand x hidden; grouped
    routing (2 groups, best 1 kept) with ``routed_scaling_factor`` 2.5 and a shared expert.
    ``time_step_min`` is 0.01 (real checkpoints: 0.001) because the mixer clamps
    ``dt >= time_step_min`` in its chunked forward and at 0.001 the clamp moves the logits by only
    ~2e-4; at 0.01 it moves them by ~2e-3.
    """
    fields = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        hybrid_override_pattern="M*ME-E",
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        intermediate_size=96,
        mlp_hidden_act="relu2",
        mamba_num_heads=8,
        mamba_head_dim=12,
        n_groups=2,
        ssm_state_size=16,
        conv_kernel=4,
        chunk_size=8,
        time_step_min=0.01,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=48,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        max_position_embeddings=512,
        initializer_range=INITIALIZER_RANGE,
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    config = transformers.NemotronHConfig(**fields)
    return _build(transformers.NemotronHForCausalLM, config, seed)


def build_qwen3_next(seed: int = 0, **overrides: Any) -> transformers.Qwen3NextForCausalLM:
    """Qwen3-Next: 4 layers, Gated DeltaNet x3 then gated attention; MoE except dense layer 2.

    2 key heads serve 4 value heads (GQA in the DeltaNet), key head dim 16 != value head dim 12;
    attention head dim 32 != 64 / 4 with partial RoPE over the first 8 dims.
    """
    fields = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=4,
        full_attention_interval=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=12,
        linear_conv_kernel_dim=4,
        intermediate_size=96,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[2],
        max_position_embeddings=512,
        initializer_range=INITIALIZER_RANGE,
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    config = transformers.Qwen3NextConfig(**fields)
    return _build(transformers.Qwen3NextForCausalLM, config, seed)


def build_qwen3_5_moe(seed: int = 0, **overrides: Any) -> transformers.Qwen3_5MoeForCausalLM:
    """Qwen3.5-MoE text model (``Qwen3_5MoeForCausalLM``, model_type ``qwen3_5_moe_text``).

    Same shapes as :func:`build_qwen3_next` but separate ``in_proj_qkv/z/b/a`` projections and MoE
    in every layer (the family has no dense layers). Text-only M-RoPE sections are set so that
    they sum to the 4 rotary frequencies; with text positions M-RoPE equals plain RoPE.
    """
    fields = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=4,
        full_attention_interval=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=12,
        linear_conv_kernel_dim=4,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        max_position_embeddings=512,
        initializer_range=INITIALIZER_RANGE,
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    config = transformers.Qwen3_5MoeTextConfig(**fields)
    return _build(transformers.Qwen3_5MoeForCausalLM, config, seed)


def build_granitemoehybrid(seed: int = 0, **overrides: Any) -> transformers.GraniteMoeHybridForCausalLM:
    """Granite 4.0-H: 4 layers ``mamba, attention, mamba, mamba``, each + MoE + shared MLP.

    Layer types are given in the legacy spelling real checkpoints use (``mamba``/``attention``);
    RoPE is on (Granite 4.0-H ships ``position_embedding_type: "nope"``; pass it as an override);
    tied embeddings as in the published models; all four multipliers differ from 1.
    """
    fields = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=4,
        layer_types=["mamba", "attention", "mamba", "mamba"],
        num_attention_heads=4,
        num_key_value_heads=2,
        position_embedding_type="rope",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        mamba_n_heads=8,
        mamba_d_head="auto",
        mamba_n_groups=2,
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_chunk_size=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=32,
        shared_intermediate_size=48,
        embedding_multiplier=3.0,
        residual_multiplier=0.5,
        attention_multiplier=0.3,
        logits_scaling=2.5,
        max_position_embeddings=512,
        initializer_range=INITIALIZER_RANGE,
        tie_word_embeddings=True,
    )
    fields.update(overrides)
    config = transformers.GraniteMoeHybridConfig(**fields)
    return _build(transformers.GraniteMoeHybridForCausalLM, config, seed)


def build_jamba(seed: int = 0, **overrides: Any) -> transformers.JambaForCausalLM:
    """Jamba: 6 layers; attention at 1 and 4 (period 3, offset 1), MoE at 1, 3, 5 (period 2, offset 1).

    So every combination is present: mamba+dense (0, 2), attention+MoE (1), mamba+MoE (3, 5),
    attention+dense (4). Mamba-1 with ``dt_rank`` = ceil(64 / 16) = 4.
    """
    fields = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=6,
        attn_layer_period=3,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        num_experts=4,
        num_experts_per_tok=2,
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_dt_rank="auto",
        max_position_embeddings=512,
        initializer_range=INITIALIZER_RANGE,
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    config = transformers.JambaConfig(**fields)
    return _build(transformers.JambaForCausalLM, config, seed)


def build_falcon_h1(seed: int = 0, **overrides: Any) -> transformers.FalconH1ForCausalLM:
    """Falcon-H1: 3 parallel hybrid layers (Mamba-2 and attention side by side) + SwiGLU MLP.

    Head dim 24 != 64 / 4; ``mamba_d_ssm`` 96 != expand x hidden; gated RMSNorm on (2 groups, gate
    before norm); every muP multiplier differs from 1 and from the others.
    """
    fields = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        intermediate_size=96,
        mamba_d_ssm=96,
        mamba_n_heads=8,
        mamba_d_head="auto",
        mamba_n_groups=2,
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_chunk_size=8,
        mamba_rms_norm=True,
        mamba_norm_before_gate=False,
        embedding_multiplier=1.7,
        lm_head_multiplier=0.6,
        mlp_multipliers=[0.9, 0.55],
        key_multiplier=0.4,
        attention_in_multiplier=1.3,
        attention_out_multiplier=0.8,
        ssm_multipliers=[0.35, 0.25, 0.45, 0.5, 0.3],
        ssm_in_multiplier=1.25,
        ssm_out_multiplier=0.7,
        max_position_embeddings=512,
        initializer_range=INITIALIZER_RANGE,
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    config = transformers.FalconH1Config(**fields)
    return _build(transformers.FalconH1ForCausalLM, config, seed)


FAMILIES: dict[str, Callable[..., transformers.PreTrainedModel]] = {
    "nemotron_h": build_nemotron_h,
    "qwen3_next": build_qwen3_next,
    "qwen3_5_moe": build_qwen3_5_moe,
    "granitemoehybrid": build_granitemoehybrid,
    "jamba": build_jamba,
    "falcon_h1": build_falcon_h1,
}
