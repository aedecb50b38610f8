"""jamba: AI21 Jamba (``JambaForCausalLM``), docs/hf-families.md §2.5.

Each decoder layer is two of our blocks: ``*`` (attention without RoPE) where
``i % attn_layer_period == attn_layer_offset``, else ``m`` (Mamba-1 with RMS-normalised dt, B, C);
then ``E`` (softmax router, top-k weights *not* renormalised) where
``i % expert_layer_period == expert_layer_offset`` and ``num_experts > 1``, else ``-`` (SwiGLU).
Dense MLP and experts share ``intermediate_size``.
"""

from __future__ import annotations

import math
from typing import Any

from hybridlm.checkpoints.hf.common import (
    Family,
    HFConfig,
    attention_rules,
    cannot_export,
    check_attention,
    check_no_multipliers,
    check_pairs,
    check_plain_moe,
    common_fields,
    common_to_hf,
    expert_rules,
    ignoring_tied_head,
    mamba_rules,
    mlp_rules,
    outer_rules,
    paired_layers,
)
from hybridlm.checkpoints.plan import Plan, rename
from hybridlm.config import AttentionConfig, HybridConfig, MambaConfig, MLPConfig, MoEConfig
from hybridlm.model import HybridLM

NAME = "jamba"
ARCHITECTURE = "JambaForCausalLM"


def config_from_hf(cfg: HFConfig) -> HybridConfig:
    num_layers = cfg.integer("num_hidden_layers", 32)
    attn_period, attn_offset = cfg.integer("attn_layer_period", 8), cfg.integer("attn_layer_offset", 4, positive=False)
    expert_period, expert_offset = (
        cfg.integer("expert_layer_period", 2),
        cfg.integer("expert_layer_offset", 1, positive=False),
    )
    num_experts = cfg.integer("num_experts", 16)
    cfg.expect("hidden_act", ("silu",), "silu", "hybridlm's Mamba-1 conv and SwiGLU use silu")
    pattern = ""
    for i in range(num_layers):
        pattern += "*" if i % attn_period == attn_offset else "m"
        pattern += "E" if i % expert_period == expert_offset and num_experts > 1 else "-"

    hidden = cfg.integer("hidden_size")
    intermediate = cfg.integer("intermediate_size", 14336)
    attention = mamba = mlp = moe = None
    if "*" in pattern:
        heads = cfg.integer("num_attention_heads", 32)
        kv_heads = cfg.integer("num_key_value_heads", heads)
        attention = AttentionConfig(
            heads,
            kv_heads,
            cfg.integer("head_dim") if cfg.get("head_dim") is not None else hidden // heads,
            rope_theta=None,
        )
    if "m" in pattern:
        dt_rank = cfg.get("mamba_dt_rank", "auto")
        mamba = MambaConfig(
            intermediate_size=int(cfg.number("mamba_expand", 2) * hidden),
            state_size=cfg.integer("mamba_d_state", 16),
            conv_kernel=cfg.integer("mamba_d_conv", 4),
            dt_rank=math.ceil(hidden / 16) if dt_rank == "auto" else cfg.integer("mamba_dt_rank"),
            use_conv_bias=cfg.flag("mamba_conv_bias", True),
            use_bias=cfg.flag("mamba_proj_bias", False),
            has_inner_norms=True,
        )
    if "-" in pattern:
        mlp = MLPConfig(intermediate, "swiglu")
    if "E" in pattern:
        moe = MoEConfig(
            num_experts=num_experts,
            num_experts_per_tok=cfg.integer("num_experts_per_tok", 2),
            intermediate_size=intermediate,
            activation="swiglu",
            scoring="softmax",
            norm_topk_prob=False,  # JambaTopKRouter leaves the top-k softmax weights as they are
            aux_loss_coef=cfg.number("router_aux_loss_coef", 0.001),
        )
    return HybridConfig(
        pattern=pattern,
        attention=attention,
        mamba=mamba,
        mlp=mlp,
        moe=moe,
        norm_eps=cfg.number("rms_norm_eps", 1e-6),
        tie_word_embeddings=cfg.flag("tie_word_embeddings", False),
        num_hidden_layers=num_layers,
        **common_fields(cfg),
    )


def _period(flags: list[bool]) -> tuple[int, int]:
    """The smallest (period, offset) with flags[i] == (i % period == offset) for every layer
    (all False: period len + 1, offset len)."""
    count = len(flags)
    for period in range(1, count + 2):
        for offset in range(period):
            if all(flag == (i % period == offset) for i, flag in enumerate(flags)):
                return period, offset
    raise ValueError(f"layers {flags} follow no period")


def config_to_hf(config: HybridConfig) -> dict[str, Any]:
    check_pairs(config, NAME, "m*", "E-")
    if config.is_norm_zero_centered:
        raise cannot_export(NAME, "is_norm_zero_centered = True", "jamba norms scale by w")
    check_no_multipliers(config, NAME)
    mixers, ffns = config.pattern[0::2], config.pattern[1::2]
    is_attention = [c == "*" for c in mixers]
    is_moe = [c == "E" for c in ffns]
    try:
        attn_period, attn_offset = _period(is_attention)
        expert_period, expert_offset = _period(is_moe)
    except ValueError:
        raise cannot_export(NAME, f"pattern {config.pattern!r}", "not periodic") from None
    out = common_to_hf(config, NAME, ARCHITECTURE)
    out.update(
        num_hidden_layers=len(mixers),
        attn_layer_period=attn_period,
        attn_layer_offset=attn_offset,
        expert_layer_period=expert_period,
        expert_layer_offset=expert_offset,
        rms_norm_eps=config.norm_eps,
        hidden_act="silu",
    )
    if any(is_attention):
        a = check_attention(config, NAME, rope_theta=None, has_qk_norm=False, has_output_gate=False, bias=False)
        if a.softmax_scale is not None and not math.isclose(a.softmax_scale, a.head_dim**-0.5):
            raise cannot_export(NAME, f"attention.softmax_scale = {a.softmax_scale}", "jamba scales by head_dim^-0.5")
        out.update(num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads)
        if a.head_dim * a.num_heads != config.hidden_size:
            out["head_dim"] = a.head_dim  # JambaAttention reads it when present
    if "m" in mixers:
        m = config.mamba
        if m.intermediate_size % config.hidden_size or not m.has_inner_norms:
            raise cannot_export(NAME, "mamba", "jamba's Mamba-1 has expand x hidden channels and dt/B/C norms")
        out.update(
            mamba_expand=m.intermediate_size // config.hidden_size,
            mamba_d_state=m.state_size,
            mamba_d_conv=m.conv_kernel,
            mamba_dt_rank=m.dt_rank,
            mamba_conv_bias=m.use_conv_bias,
            mamba_proj_bias=m.use_bias,
        )
    sizes = set()
    if "-" in ffns:
        if config.mlp.activation != "swiglu" or config.mlp.bias:
            raise cannot_export(NAME, "mlp", "jamba's dense MLP is SwiGLU without bias")
        sizes.add(config.mlp.intermediate_size)
    if any(is_moe):
        moe = check_plain_moe(config, NAME)
        if moe.norm_topk_prob or moe.num_shared_experts:
            raise cannot_export(
                NAME, "moe", "jamba keeps the top-k softmax weights unnormalised and has no shared expert"
            )
        sizes.add(moe.intermediate_size)
        out.update(num_experts=moe.num_experts, num_experts_per_tok=moe.num_experts_per_tok)
        out["router_aux_loss_coef"] = moe.aux_loss_coef
    else:
        out.update(num_experts=1, num_experts_per_tok=1)
    if len(sizes) > 1:
        raise cannot_export(NAME, "mlp / moe intermediate sizes differ", "jamba uses one intermediate_size for both")
    out["intermediate_size"] = sizes.pop() if sizes else 4 * config.hidden_size
    return out


def plan(model: HybridLM) -> Plan:
    config = model.config
    rules = outer_rules(config, final_norm="final_layernorm")
    for layer in paired_layers(config, pre_ffn_norm="pre_ff_layernorm"):
        disk, mixer, ffn = layer.disk, layer.mixer, layer.ffn
        rules += [layer.input_norm, layer.pre_ffn_norm]
        if layer.mixer_char == "m":
            rules += mamba_rules(mixer, f"{disk}.mamba", config.mamba)
        else:
            rules += attention_rules(mixer, f"{disk}.self_attn", config.attention)
        if layer.ffn_char == "E":
            rules.append(rename(f"{ffn}.gate.weight", f"{disk}.feed_forward.router.weight"))
            rules += expert_rules(f"{ffn}.experts", f"{disk}.feed_forward.experts", config.moe)
        else:
            rules += mlp_rules(ffn, f"{disk}.feed_forward", config.mlp)
    return Plan(rules, ignoring_tied_head(config))


FAMILY = Family(NAME, (NAME,), ARCHITECTURE, "m*E-", config_from_hf, config_to_hf, plan)
