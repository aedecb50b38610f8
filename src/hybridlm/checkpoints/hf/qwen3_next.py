"""qwen3_next (``Qwen3NextForCausalLM``) and qwen3_5_moe (``Qwen3_5MoeForCausalLM``), docs/hf-families.md §2.2-2.3.

Each decoder layer is two of our blocks: ``G`` (Gated DeltaNet) or ``*`` (gated attention with
zero-centred q/k norms and partial RoPE), then ``E`` (softmax router + sigmoid-gated shared expert)
or ``-`` (SwiGLU). Every RMSNorm but the DeltaNet's gated one is zero-centred (``1 + w``).

Our DeltaNet holds Qwen3.5's separate projections; Qwen3-Next's ``in_proj_qkvz`` / ``in_proj_ba``
interleave q, k, v, z (and b, a) per key-head group, so they are converted here, exactly, both ways.
Qwen3.5-MoE checkpoints may be composite (``model.language_model.`` prefix, ``text_config``,
``model.visual.*`` and ``mtp.*``, ignored); export writes the text-only ``qwen3_5_moe_text`` model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

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
    layer_types,
    mlp_rules,
    outer_rules,
    paired_layers,
    rope,
)
from hybridlm.checkpoints.plan import Layout, Plan, Rule, rename
from hybridlm.config import AttentionConfig, GatedDeltaNetConfig, HybridConfig, MLPConfig, MoEConfig
from hybridlm.model import HybridLM

MIXER_OF_TYPE = {"linear_attention": "G", "full_attention": "*"}
TYPE_OF_MIXER = {char: name for name, char in MIXER_OF_TYPE.items()}


def _text_config(cfg: HFConfig) -> HFConfig:
    """A composite qwen3_5_moe config.json holds the language model's fields under text_config."""
    text = cfg.data.get("text_config")
    if not isinstance(text, dict):
        return cfg
    merged = dict(text)
    if "tie_word_embeddings" in cfg.data:  # Qwen3_5MoeConfig's own flag governs the composite model
        merged["tie_word_embeddings"] = cfg.data["tie_word_embeddings"]
    merged.setdefault("model_type", cfg.data.get("model_type"))
    return HFConfig(merged, cfg.path)


def _config_from_hf(cfg: HFConfig, is_qwen3_5: bool) -> HybridConfig:
    cfg = _text_config(cfg)
    num_layers = cfg.integer("num_hidden_layers")
    types = layer_types(cfg, "layer_types")
    if types is None:
        interval = cfg.integer("full_attention_interval", 4)
        types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(num_layers)]
    if len(types) != num_layers:
        raise ValueError(f"{cfg.path}: layer_types has {len(types)} entries but num_hidden_layers is {num_layers}")
    cfg.expect("hidden_act", ("silu",), "silu", "hybridlm's DeltaNet conv and SwiGLU use silu")
    num_experts = cfg.integer("num_experts", 256 if is_qwen3_5 else 512, positive=False)
    mlp_only = set(cfg.get("mlp_only_layers", []))
    sparse_step = cfg.integer("decoder_sparse_step", 1)
    pattern = ""
    for index, name in enumerate(types):
        if name not in MIXER_OF_TYPE:
            raise ValueError(
                f"{cfg.path}: layer_types[{index}] = {name!r}; expected linear_attention or full_attention"
            )
        is_moe = is_qwen3_5 or (index not in mlp_only and num_experts > 0 and (index + 1) % sparse_step == 0)
        pattern += MIXER_OF_TYPE[name] + ("E" if is_moe else "-")

    attention = gdn = mlp = moe = None
    if "*" in pattern:
        theta, partial = rope(cfg, default_partial=0.25)
        heads = cfg.integer("num_attention_heads")
        attention = AttentionConfig(
            num_heads=heads,
            num_kv_heads=cfg.integer("num_key_value_heads", heads),
            head_dim=cfg.integer("head_dim", 256),
            rope_theta=theta,
            partial_rotary_factor=partial,
            has_qk_norm=True,
            has_output_gate=True,
            bias=cfg.flag("attention_bias", False),
        )
    if "G" in pattern:
        gdn = GatedDeltaNetConfig(
            num_key_heads=cfg.integer("linear_num_key_heads", 16),
            num_value_heads=cfg.integer("linear_num_value_heads", 32),
            key_head_dim=cfg.integer("linear_key_head_dim", 128),
            value_head_dim=cfg.integer("linear_value_head_dim", 128),
            conv_kernel=cfg.integer("linear_conv_kernel_dim", 4),
            chunk_size=64,  # transformers' torch_chunk_gated_delta_rule hard-codes 64
        )
    if "-" in pattern:
        mlp = MLPConfig(cfg.integer("intermediate_size", 5632), "swiglu")
    if "E" in pattern:
        shared = cfg.integer("shared_expert_intermediate_size", 512, positive=False)
        if shared <= 0:
            raise cfg.unsupported("shared_expert_intermediate_size", "a Qwen MoE layer always has a shared expert")
        moe = MoEConfig(
            num_experts=num_experts,
            num_experts_per_tok=cfg.integer("num_experts_per_tok", 8 if is_qwen3_5 else 10),
            intermediate_size=cfg.integer("moe_intermediate_size", 512),
            activation="swiglu",
            scoring="softmax",
            norm_topk_prob=True if is_qwen3_5 else cfg.flag("norm_topk_prob", True),
            num_shared_experts=1,
            shared_intermediate_size=shared,
            has_shared_expert_gate=True,
            aux_loss_coef=cfg.number("router_aux_loss_coef", 0.001),
        )
    return HybridConfig(
        pattern=pattern,
        attention=attention,
        gdn=gdn,
        mlp=mlp,
        moe=moe,
        norm_eps=cfg.number("rms_norm_eps", 1e-6),
        is_norm_zero_centered=True,
        tie_word_embeddings=cfg.flag("tie_word_embeddings", False),
        num_hidden_layers=num_layers,
        **common_fields(cfg),
    )


def _config_to_hf(config: HybridConfig, family: str, architecture: str) -> dict[str, Any]:
    is_qwen3_5 = family == "qwen3_5_moe"
    check_pairs(config, family, "G*", "E" if is_qwen3_5 else "E-")
    if not config.is_norm_zero_centered:
        raise cannot_export(family, "is_norm_zero_centered = False", f"{family} norms scale by 1 + w")
    check_no_multipliers(config, family)
    model_type = "qwen3_5_moe_text" if is_qwen3_5 else family
    out = common_to_hf(config, model_type, architecture)
    mixers = config.pattern[0::2]
    out.update(
        num_hidden_layers=len(mixers),
        layer_types=[TYPE_OF_MIXER[c] for c in mixers],
        rms_norm_eps=config.norm_eps,
        hidden_act="silu",
    )
    if config.attention is not None and "*" in mixers:
        a = check_attention(config, family, has_qk_norm=True, has_output_gate=True)
        if a.rope_theta is None:
            raise cannot_export(family, "attention.rope_theta = None", f"{family} attention uses RoPE")
        if a.softmax_scale is not None and not math.isclose(a.softmax_scale, a.head_dim**-0.5):
            raise cannot_export(family, f"attention.softmax_scale = {a.softmax_scale}", "Qwen scales by head_dim^-0.5")
        rope_parameters = {
            "rope_type": "default",
            "rope_theta": a.rope_theta,
            "partial_rotary_factor": a.partial_rotary_factor,
        }
        if is_qwen3_5:  # text positions make M-RoPE plain RoPE; any split of the rotary frequencies will do
            half = a.rotary_dim // 2
            rope_parameters["mrope_section"] = [half // 3 + (i < half % 3) for i in range(3)]
            rope_parameters["mrope_interleaved"] = True
        out.update(
            num_attention_heads=a.num_heads,
            num_key_value_heads=a.num_kv_heads,
            head_dim=a.head_dim,
            attention_bias=a.bias,
            rope_parameters=rope_parameters,
        )
    if config.gdn is not None and "G" in mixers:
        g = config.gdn
        out.update(
            linear_num_key_heads=g.num_key_heads,
            linear_num_value_heads=g.num_value_heads,
            linear_key_head_dim=g.key_head_dim,
            linear_value_head_dim=g.value_head_dim,
            linear_conv_kernel_dim=g.conv_kernel,
        )
    ffns = config.pattern[1::2]
    if "-" in ffns:
        if config.mlp.activation != "swiglu" or config.mlp.bias:
            raise cannot_export(family, "mlp", f"{family} dense MLPs are SwiGLU without bias")
        out["intermediate_size"] = config.mlp.intermediate_size
    if not is_qwen3_5:
        out.update(decoder_sparse_step=1, mlp_only_layers=[i for i, c in enumerate(ffns) if c == "-"])
    if "E" in ffns:
        moe = check_plain_moe(config, family)
        if not moe.has_shared_expert_gate or moe.num_shared_experts < 1:
            raise cannot_export(
                family, "moe shared expert", f"{family} MoE layers have one sigmoid-gated shared expert"
            )
        if is_qwen3_5 and not moe.norm_topk_prob:
            raise cannot_export(family, "moe.norm_topk_prob = False", "qwen3_5_moe always renormalises top-k")
        out.update(
            num_experts=moe.num_experts,
            num_experts_per_tok=moe.num_experts_per_tok,
            moe_intermediate_size=moe.intermediate_size,
            shared_expert_intermediate_size=moe.num_shared_experts * moe.shared_intermediate_size,
            router_aux_loss_coef=moe.aux_loss_coef,
        )
        if not is_qwen3_5:
            out["norm_topk_prob"] = moe.norm_topk_prob
    elif not is_qwen3_5:
        out["num_experts"] = 0
    return out


# -- Qwen3-Next's interleaved projections <-> our separate ones (docs/hf-families.md §1.3) ----------


def _qkvz_layout(key: str, gdn: GatedDeltaNetConfig) -> Layout:
    nk, dk, dv = gdn.num_key_heads, gdn.key_head_dim, gdn.value_head_dim
    r = gdn.num_value_heads // nk  # value heads per key head

    def to_ours(ts: list[Tensor]) -> list[Tensor]:
        grouped = ts[0].view(nk, 2 * dk + 2 * r * dv, -1)  # (group, rows of the group, hidden)
        q, k, v, z = grouped.split([dk, dk, r * dv, r * dv], dim=1)
        hidden = grouped.shape[-1]
        qkv = torch.cat([q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)])
        return [qkv, z.reshape(-1, hidden)]

    def to_disk(ts: list[Tensor]) -> list[Tensor]:
        qkv, z = ts
        hidden = qkv.shape[-1]
        q, k, v = qkv.split([nk * dk, nk * dk, nk * r * dv])
        parts = [q.view(nk, dk, hidden), k.view(nk, dk, hidden), v.view(nk, r * dv, hidden), z.view(nk, r * dv, hidden)]
        return [torch.cat(parts, dim=1).reshape(-1, hidden)]

    return Layout((key,), to_ours, to_disk)


def _ba_layout(key: str, gdn: GatedDeltaNetConfig) -> Layout:
    nk = gdn.num_key_heads
    r = gdn.num_value_heads // nk

    def to_ours(ts: list[Tensor]) -> list[Tensor]:
        grouped = ts[0].view(nk, 2 * r, -1)
        b, a = grouped.split([r, r], dim=1)
        return [b.reshape(-1, grouped.shape[-1]), a.reshape(-1, grouped.shape[-1])]

    def to_disk(ts: list[Tensor]) -> list[Tensor]:
        b, a = ts
        hidden = b.shape[-1]
        return [torch.cat([b.view(nk, r, hidden), a.view(nk, r, hidden)], dim=1).reshape(-1, hidden)]

    return Layout((key,), to_ours, to_disk)


def _gdn_rules(ours: str, disk: str, gdn: GatedDeltaNetConfig, is_qwen3_5: bool) -> list[Rule]:
    rules = [rename(f"{ours}.{n}", f"{disk}.{n}") for n in ("conv1d.weight", "dt_bias", "A_log", "norm.weight")]
    rules.append(rename(f"{ours}.out_proj.weight", f"{disk}.out_proj.weight"))
    if is_qwen3_5:
        names = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")
        return rules + [rename(f"{ours}.{n}.weight", f"{disk}.{n}.weight") for n in names]
    qkvz = Rule(
        (f"{ours}.in_proj_qkv.weight", f"{ours}.in_proj_z.weight"), (_qkvz_layout(f"{disk}.in_proj_qkvz.weight", gdn),)
    )
    ba = Rule((f"{ours}.in_proj_b.weight", f"{ours}.in_proj_a.weight"), (_ba_layout(f"{disk}.in_proj_ba.weight", gdn),))
    return [*rules, qkvz, ba]


def _plan(model: HybridLM, is_qwen3_5: bool) -> Plan:
    config = model.config
    rules = outer_rules(config, final_norm="norm")
    for layer in paired_layers(config, pre_ffn_norm="post_attention_layernorm"):
        disk, mixer, ffn = layer.disk, layer.mixer, layer.ffn
        rules += [layer.input_norm, layer.pre_ffn_norm]
        if layer.mixer_char == "G":
            rules += _gdn_rules(mixer, f"{disk}.linear_attn", config.gdn, is_qwen3_5)
        else:
            rules += attention_rules(mixer, f"{disk}.self_attn", config.attention)
        if layer.ffn_char == "E":
            rules += [
                rename(f"{ffn}.gate.weight", f"{disk}.mlp.gate.weight"),
                *expert_rules(f"{ffn}.experts", f"{disk}.mlp.experts", config.moe),
                *mlp_rules(f"{ffn}.shared_experts", f"{disk}.mlp.shared_expert", config.moe),
                rename(f"{ffn}.shared_expert_gate.weight", f"{disk}.mlp.shared_expert_gate.weight"),
            ]
        else:
            rules += mlp_rules(ffn, f"{disk}.mlp", config.mlp)
    return Plan(rules, ignoring_tied_head(config, _canonical))


def _canonical(key: str) -> str | None:
    if key.startswith(("mtp.", "model.visual.")):  # multi-token prediction; the vision tower
        return None
    if key.startswith("model.language_model."):  # composite Qwen3.5 checkpoints
        return "model." + key.removeprefix("model.language_model.")
    return key


QWEN3_NEXT = Family(
    "qwen3_next",
    ("qwen3_next",),
    "Qwen3NextForCausalLM",
    "G*E-",
    lambda cfg: _config_from_hf(cfg, is_qwen3_5=False),
    lambda config: _config_to_hf(config, "qwen3_next", "Qwen3NextForCausalLM"),
    lambda model: _plan(model, is_qwen3_5=False),
)
QWEN3_5_MOE = Family(
    "qwen3_5_moe",
    ("qwen3_5_moe", "qwen3_5_moe_text"),
    "Qwen3_5MoeForCausalLM",
    "G*E",
    lambda cfg: _config_from_hf(cfg, is_qwen3_5=True),
    lambda config: _config_to_hf(config, "qwen3_5_moe", "Qwen3_5MoeForCausalLM"),
    lambda model: _plan(model, is_qwen3_5=True),
)
