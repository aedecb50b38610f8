"""granitemoehybrid: IBM Granite 4.0-H (``GraniteMoeHybridForCausalLM``), docs/hf-families.md §2.4.

Each decoder layer is two of our blocks: ``M`` (Mamba-2) or ``*`` (attention, RoPE only when
``position_embedding_type == "rope"``, softmax scale ``attention_multiplier``), then ``E`` (routed
experts + the ungated shared MLP) or, for a model without experts, ``-`` (the shared MLP alone).
Both blocks' outputs are scaled by ``residual_multiplier``; embeddings by ``embedding_multiplier``;
logits are divided by ``logits_scaling``. Experts are 3-D on disk under legacy names
(``input_linear`` = ``[gate; up]``, ``output_linear``, ``router.layer``).
"""

from __future__ import annotations

from typing import Any

from hybridlm.checkpoints.hf.common import (
    Family,
    HFConfig,
    attention_rules,
    cannot_export,
    check_attention,
    check_pairs,
    check_plain_moe,
    common_fields,
    common_to_hf,
    ignoring_tied_head,
    layer_types,
    mamba2_from_hf,
    mamba2_rules,
    outer_rules,
    paired_layers,
    rope,
)
from hybridlm.checkpoints.plan import Plan, rename, split_rows
from hybridlm.config import AttentionConfig, HybridConfig, MLPConfig, MoEConfig
from hybridlm.model import HybridLM

NAME = "granitemoehybrid"
ARCHITECTURE = "GraniteMoeHybridForCausalLM"
MIXER_OF_TYPE = {"linear_attention": "M", "full_attention": "*"}
TYPE_OF_MIXER = {char: name for name, char in MIXER_OF_TYPE.items()}


def config_from_hf(cfg: HFConfig) -> HybridConfig:
    num_layers = cfg.integer("num_hidden_layers")
    types = layer_types(cfg, "layer_types", "layers_block_type") or ["linear_attention"] * num_layers
    if len(types) != num_layers:
        raise ValueError(f"{cfg.path}: layer_types has {len(types)} entries but num_hidden_layers is {num_layers}")
    cfg.expect("hidden_act", ("silu",), "silu", "hybridlm's Mamba-2 conv and SwiGLU use silu")
    num_experts = cfg.integer("num_local_experts", 8, positive=False)
    shared_size = cfg.integer("shared_intermediate_size", 1024, positive=False)
    ffn = "E" if num_experts > 0 else "-"
    pattern = ""
    for index, name in enumerate(types):
        if name not in MIXER_OF_TYPE:
            raise ValueError(f"{cfg.path}: layer_types[{index}] = {name!r}; expected mamba or attention")
        pattern += MIXER_OF_TYPE[name] + ffn

    hidden = cfg.integer("hidden_size")
    attention = mamba2 = mlp = moe = None
    if "*" in pattern:
        heads = cfg.integer("num_attention_heads")
        theta = None
        position_embedding = cfg.get("position_embedding_type", "nope")
        if position_embedding not in ("nope", "rope"):
            raise cfg.unsupported("position_embedding_type", "granitemoehybrid attention has RoPE ('rope') or none")
        if position_embedding == "rope":
            theta, partial = rope(cfg)
            if partial != 1.0:
                raise ValueError(f"{cfg.path}: partial_rotary_factor = {partial} is not supported for granitemoehybrid")
        attention = AttentionConfig(
            num_heads=heads,
            num_kv_heads=cfg.integer("num_key_value_heads", heads),
            head_dim=cfg.integer("head_dim") if cfg.get("head_dim") is not None else hidden // heads,
            rope_theta=theta,
            bias=cfg.flag("attention_bias", False),
            softmax_scale=cfg.number("attention_multiplier", 1.0),  # replaces head_dim^-0.5; read, never derive
        )
    if "M" in pattern:
        inner = int(cfg.number("mamba_expand", 2) * hidden)
        mamba2 = mamba2_from_hf(cfg, inner, f"mamba_expand x hidden_size = {inner}")
    if num_experts > 0:
        if shared_size <= 0:
            raise cfg.unsupported("shared_intermediate_size", "hybridlm's E block needs the shared MLP")
        moe = MoEConfig(
            num_experts=num_experts,
            num_experts_per_tok=cfg.integer("num_experts_per_tok", 2),
            intermediate_size=cfg.integer("intermediate_size", 11008),
            activation="swiglu",
            scoring="softmax",
            norm_topk_prob=True,  # softmax over the top-k logits = renormalised top-k softmax
            num_shared_experts=1,
            shared_intermediate_size=shared_size,
            aux_loss_coef=cfg.number("router_aux_loss_coef", 0.001),
        )
    else:
        mlp = MLPConfig(shared_size, "swiglu")
    return HybridConfig(
        pattern=pattern,
        attention=attention,
        mamba2=mamba2,
        mlp=mlp,
        moe=moe,
        norm_eps=cfg.number("rms_norm_eps", 1e-6),
        tie_word_embeddings=cfg.flag("tie_word_embeddings", False),
        embedding_multiplier=cfg.number("embedding_multiplier", 1.0),
        residual_multiplier=cfg.number("residual_multiplier", 1.0),
        logits_scaling=cfg.number("logits_scaling", 1.0),
        num_hidden_layers=num_layers,
        **common_fields(cfg),
    )


def config_to_hf(config: HybridConfig) -> dict[str, Any]:
    check_pairs(config, NAME, "M*", "E-")
    ffns = set(config.pattern[1::2])
    if len(ffns) > 1:
        raise cannot_export(NAME, "both E and - blocks", "granitemoehybrid has experts in every layer or in none")
    if config.is_norm_zero_centered:
        raise cannot_export(NAME, "is_norm_zero_centered = True", "granitemoehybrid norms scale by w")
    mixers = config.pattern[0::2]
    out = common_to_hf(config, NAME, ARCHITECTURE)
    out.update(
        num_hidden_layers=len(mixers),
        layer_types=[TYPE_OF_MIXER[c] for c in mixers],
        rms_norm_eps=config.norm_eps,
        hidden_act="silu",
        embedding_multiplier=config.embedding_multiplier,
        residual_multiplier=config.residual_multiplier,
        logits_scaling=config.logits_scaling,
    )
    if "*" in mixers:
        a = check_attention(config, NAME, has_qk_norm=False, has_output_gate=False, partial_rotary_factor=1.0)
        if a.head_dim * a.num_heads != config.hidden_size:
            raise cannot_export(NAME, f"attention.head_dim = {a.head_dim}", "granitemoehybrid uses hidden / heads")
        out.update(
            num_attention_heads=a.num_heads,
            num_key_value_heads=a.num_kv_heads,
            attention_bias=a.bias,
            attention_multiplier=a.softmax_scale if a.softmax_scale is not None else a.head_dim**-0.5,
            position_embedding_type="nope" if a.rope_theta is None else "rope",
        )
        if a.rope_theta is not None:
            out["rope_parameters"] = {"rope_type": "default", "rope_theta": a.rope_theta}
    if "M" in mixers:
        m = config.mamba2
        if m.intermediate_size % config.hidden_size or m.norm_before_gate:
            raise cannot_export(
                NAME, "mamba2", "granitemoehybrid needs num_heads x head_dim = a multiple of hidden_size, gate first"
            )
        out.update(
            mamba_n_heads=m.num_heads,
            mamba_d_head=m.head_dim,
            mamba_expand=m.intermediate_size // config.hidden_size,
            mamba_d_state=m.state_size,
            mamba_n_groups=m.num_groups,
            mamba_d_conv=m.conv_kernel,
            mamba_chunk_size=m.chunk_size,
            mamba_conv_bias=m.use_conv_bias,
            mamba_proj_bias=m.use_bias,
            time_step_limit=list(m.time_step_limit),
        )
    if "E" in ffns:
        moe = check_plain_moe(config, NAME)
        if not moe.norm_topk_prob or moe.has_shared_expert_gate or moe.num_shared_experts < 1:
            raise cannot_export(
                NAME, "moe", "granitemoehybrid renormalises the top-k and adds one ungated shared MLP to the experts"
            )
        out.update(
            num_local_experts=moe.num_experts,
            num_experts_per_tok=moe.num_experts_per_tok,
            intermediate_size=moe.intermediate_size,
            shared_intermediate_size=moe.num_shared_experts * moe.shared_intermediate_size,
            router_aux_loss_coef=moe.aux_loss_coef,
        )
    else:
        if config.mlp.activation != "swiglu" or config.mlp.bias:
            raise cannot_export(NAME, "mlp", "granitemoehybrid's shared MLP is SwiGLU without bias")
        out.update(num_local_experts=0, shared_intermediate_size=config.mlp.intermediate_size)
    return out


def plan(model: HybridLM) -> Plan:
    config = model.config
    rules = outer_rules(config, final_norm="norm")
    for layer in paired_layers(config, pre_ffn_norm="post_attention_layernorm"):
        disk, mixer, ffn = layer.disk, layer.mixer, layer.ffn
        rules += [layer.input_norm, layer.pre_ffn_norm]
        if layer.mixer_char == "M":
            rules += mamba2_rules(mixer, f"{disk}.mamba", config.mamba2)
        else:
            rules += attention_rules(mixer, f"{disk}.self_attn", config.attention)
        moe = f"{disk}.block_sparse_moe"
        if layer.ffn_char == "E":
            shared, size = f"{ffn}.shared_experts", config.moe.num_shared_experts * config.moe.shared_intermediate_size
            rules += [
                rename(f"{ffn}.gate.weight", f"{moe}.router.layer.weight", f"{moe}.router.weight"),
                rename(f"{ffn}.experts.gate_up_proj", f"{moe}.input_linear.weight", f"{moe}.experts.gate_up_proj"),
                rename(f"{ffn}.experts.down_proj", f"{moe}.output_linear.weight", f"{moe}.experts.down_proj"),
            ]
        else:
            shared, size = ffn, config.mlp.intermediate_size
        rules += [
            split_rows(
                [f"{shared}.gate_proj.weight", f"{shared}.up_proj.weight"],
                f"{disk}.shared_mlp.input_linear.weight",
                [size, size],
            ),
            rename(f"{shared}.down_proj.weight", f"{disk}.shared_mlp.output_linear.weight"),
        ]
    return Plan(rules, ignoring_tied_head(config))


FAMILY = Family(NAME, (NAME,), ARCHITECTURE, "M*E-", config_from_hf, config_to_hf, plan)
