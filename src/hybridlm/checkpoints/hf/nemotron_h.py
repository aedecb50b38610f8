"""nemotron_h: NVIDIA Nemotron-H / Nemotron 3 (``NemotronHForCausalLM``), docs/hf-families.md §2.1.

One residual block per config entry, the same characters as ours (``M * - E``); the names on disk
are ours under ``backbone.`` (transformers 5.x also reads ``model.``). Attention has no RoPE, the
dense MLP and the experts are squared-ReLU without a gate, the router is sigmoid with a
selection-only bias and group-limited top-k, the shared expert is ungated, and the Mamba-2 dt is
clamped from below at ``time_step_min`` (not ``time_step_limit``).
"""

from __future__ import annotations

import math
from typing import Any

from hybridlm.checkpoints.hf.common import (
    Family,
    HFConfig,
    attention_rules,
    cannot_export,
    check_no_multipliers,
    common_fields,
    common_to_hf,
    expert_rules,
    layer_types,
    mamba2_rules,
    mlp_rules,
    real_number,
    whole_number,
)
from hybridlm.checkpoints.plan import Plan, rename
from hybridlm.config import AttentionConfig, HybridConfig, Mamba2Config, MLPConfig, MoEConfig
from hybridlm.model import HybridLM

NAME = "nemotron_h"
ARCHITECTURE = "NemotronHForCausalLM"
CHAR_OF_TYPE = {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E"}
TYPE_OF_CHAR = {char: name for name, char in CHAR_OF_TYPE.items()}
# NemotronHConfig.__post_init__: legacy config.json spellings, which win when present
LEGACY_NAMES = {
    "n_groups": "mamba_n_groups",
    "conv_kernel": "mamba_d_conv",
    "time_step_min": "mamba_dt_min",
    "time_step_max": "mamba_dt_max",
    "time_step_floor": "mamba_dt_init_floor",
    "use_conv_bias": "mamba_conv_bias",
    "chunk_size": "mamba_chunk_size",
}


def _field(cfg: HFConfig, name: str, default: Any) -> Any:
    legacy = LEGACY_NAMES.get(name)
    if legacy is not None and cfg.data.get(legacy) is not None:
        return cfg.data[legacy]
    return cfg.get(name, default)


def _integer(cfg: HFConfig, name: str, default: int) -> int:
    return whole_number(_field(cfg, name, default), name, cfg.path)


def _number(cfg: HFConfig, name: str, default: float) -> float:
    return real_number(_field(cfg, name, default), name, cfg.path)


def _pattern(cfg: HFConfig) -> str:
    types = layer_types(cfg, "layers_block_type", "layer_types")
    if types is None:
        pattern = cfg.get("hybrid_override_pattern")
        if pattern is None:  # NemotronHConfig's default
            types = ["linear_attention", "moe", "full_attention", "mlp"]
        else:
            types = [TYPE_OF_CHAR.get(char, char) for char in pattern]
    for index, name in enumerate(types):
        if name not in CHAR_OF_TYPE:
            raise ValueError(
                f"{cfg.path}: layer {index} has type {name!r}; nemotron_h layers are "
                f"{', '.join(CHAR_OF_TYPE)} (or hybrid_override_pattern characters M * - E)"
            )
    return "".join(CHAR_OF_TYPE[name] for name in types)


def config_from_hf(cfg: HFConfig) -> HybridConfig:
    pattern = _pattern(cfg)
    if cfg.get("moe_latent_size") is not None:
        raise cfg.unsupported("moe_latent_size", "latent MoE projections (fc1/fc2_latent_proj) have no hybridlm block")
    cfg.expect("mamba_hidden_act", ("silu",), "silu", "the Mamba-2 conv activation is silu in hybridlm")
    cfg.expect("mlp_hidden_act", ("relu2",), "relu2", "nemotron_h MLPs and experts are ported as squared ReLU")
    has_mlp_bias = cfg.flag("mlp_bias", False)
    if has_mlp_bias and "E" in pattern:
        raise cfg.unsupported("mlp_bias", "hybridlm's MoE experts and shared expert have no biases")
    heads = cfg.integer("num_attention_heads", 32)
    attention = mamba2 = mlp = moe = None
    if "*" in pattern:
        # attention_bias is ignored by transformers' NemotronHAttention (no bias ever)
        head_key = "head_dim" if cfg.get("head_dim") is not None else "attention_head_dim"
        head_dim = cfg.integer(head_key, 128)
        attention = AttentionConfig(heads, cfg.integer("num_key_value_heads", heads), head_dim, rope_theta=None)
    if "M" in pattern:
        time_step_min = _number(cfg, "time_step_min", 0.001)
        mamba2 = Mamba2Config(
            num_heads=cfg.integer("mamba_num_heads", 128),
            head_dim=cfg.integer("mamba_head_dim", 64),
            state_size=cfg.integer("ssm_state_size", 128),
            num_groups=_integer(cfg, "n_groups", 8),
            conv_kernel=_integer(cfg, "conv_kernel", 4),
            chunk_size=_integer(cfg, "chunk_size", 128),
            use_conv_bias=cfg.flag("use_conv_bias", _field(cfg, "use_conv_bias", True)),
            use_bias=cfg.flag("use_bias", False),
            # the dt init draws log-uniformly from [min, max]: a clamp at 0 (no clamp) needs another lower end
            time_step_min=time_step_min if time_step_min > 0 else Mamba2Config.time_step_min,
            time_step_max=_number(cfg, "time_step_max", 0.1),
            time_step_floor=_number(cfg, "time_step_floor", 1e-4),
            # NemotronHMamba2Mixer: time_step_limit = (config.time_step_min, inf), whatever time_step_limit says
            time_step_limit=(time_step_min, math.inf),
        )
    if "-" in pattern:
        mlp = MLPConfig(cfg.integer("intermediate_size", 21504), "relu2", bias=has_mlp_bias)
    if "E" in pattern:
        moe = MoEConfig(
            num_experts=cfg.integer(
                "n_routed_experts" if cfg.get("n_routed_experts") is not None else "num_local_experts", 8
            ),
            num_experts_per_tok=cfg.integer("num_experts_per_tok", 2),
            intermediate_size=cfg.integer("moe_intermediate_size", 7688),
            activation="relu2",
            scoring="sigmoid",
            norm_topk_prob=cfg.flag("norm_topk_prob", True),
            routed_scaling_factor=cfg.number("routed_scaling_factor", 1.0),
            use_expert_bias=True,
            num_groups=cfg.integer("n_group", 1),
            topk_groups=cfg.integer("topk_group", 1),
            num_shared_experts=1,
            shared_intermediate_size=cfg.integer("moe_shared_expert_intermediate_size", 7688),
        )
    return HybridConfig(
        pattern=pattern,
        attention=attention,
        mamba2=mamba2,
        mlp=mlp,
        moe=moe,
        norm_eps=cfg.number("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=False,  # ignored by NemotronHForCausalLM: lm_head is always its own tensor
        num_hidden_layers=len(pattern),
        **common_fields(cfg),
    )


def config_to_hf(config: HybridConfig) -> dict[str, Any]:
    unsupported = sorted(set(config.pattern) - set(TYPE_OF_CHAR))
    if unsupported:
        raise cannot_export(NAME, f"block type(s) {', '.join(unsupported)}", "nemotron_h has only M * - E blocks")
    check_no_multipliers(config, NAME)
    if config.is_norm_zero_centered:
        raise cannot_export(NAME, "is_norm_zero_centered = True", "nemotron_h norms scale by w, not 1 + w")
    out = common_to_hf(config, NAME, ARCHITECTURE)
    out.update(
        layers_block_type=[TYPE_OF_CHAR[c] for c in config.pattern],
        layer_norm_epsilon=config.norm_eps,
        tie_word_embeddings=False,
        mamba_hidden_act="silu",
        mlp_hidden_act="relu2",
    )
    if "*" in config.pattern:
        out.update(_attention_to_hf(config))
    if "M" in config.pattern:
        out.update(_mamba2_to_hf(config))
    if "-" in config.pattern:
        if config.mlp.activation != "relu2":
            raise cannot_export(NAME, f"mlp.activation = {config.mlp.activation!r}", "nemotron_h MLPs are relu2")
        out.update(intermediate_size=config.mlp.intermediate_size, mlp_bias=config.mlp.bias)
    if "E" in config.pattern:
        out.update(_moe_to_hf(config))
    return out


def _attention_to_hf(config: HybridConfig) -> dict[str, Any]:
    a = config.attention
    problems = {
        "rope_theta": (a.rope_theta, None, "nemotron_h attention has no positional encoding"),
        "has_qk_norm": (a.has_qk_norm, False, "no q/k norm in nemotron_h"),
        "has_output_gate": (a.has_output_gate, False, "no output gate in nemotron_h"),
        "bias": (a.bias, False, "nemotron_h attention has no biases"),
    }
    for option, (value, wanted, why) in problems.items():
        if value != wanted:
            raise cannot_export(NAME, f"attention.{option} = {value!r}", why)
    if a.softmax_scale is not None and not math.isclose(a.softmax_scale, a.head_dim**-0.5):
        raise cannot_export(NAME, f"attention.softmax_scale = {a.softmax_scale}", "nemotron_h scales by head_dim^-0.5")
    return dict(num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads, head_dim=a.head_dim)


def _mamba2_to_hf(config: HybridConfig) -> dict[str, Any]:
    m = config.mamba2
    low, high = m.time_step_limit
    if high != math.inf:
        raise cannot_export(
            NAME, f"mamba2.time_step_limit = {m.time_step_limit}", "nemotron_h clamps dt from below only"
        )
    if m.norm_before_gate:
        raise cannot_export(NAME, "mamba2.norm_before_gate = True", "nemotron_h gates before its grouped norm")
    return dict(
        mamba_num_heads=m.num_heads,
        mamba_head_dim=m.head_dim,
        ssm_state_size=m.state_size,
        n_groups=m.num_groups,
        conv_kernel=m.conv_kernel,
        chunk_size=m.chunk_size,
        use_conv_bias=m.use_conv_bias,
        use_bias=m.use_bias,
        time_step_min=low,  # the clamp (0: none); nemotron_h derives it from time_step_min
        time_step_max=m.time_step_max,
        time_step_floor=m.time_step_floor,
        expand=max(1, m.intermediate_size // config.hidden_size),  # unused by the forward
    )


def _moe_to_hf(config: HybridConfig) -> dict[str, Any]:
    moe = config.moe
    problems = {
        "activation": (moe.activation, "relu2", "nemotron_h experts are relu2 without a gate"),
        "scoring": (moe.scoring, "sigmoid", "the nemotron_h router is sigmoid"),
        "use_expert_bias": (moe.use_expert_bias, True, "nemotron_h routers always carry e_score_correction_bias"),
        "has_shared_expert_gate": (moe.has_shared_expert_gate, False, "the nemotron_h shared expert is ungated"),
    }
    for option, (value, wanted, why) in problems.items():
        if value != wanted:
            raise cannot_export(NAME, f"moe.{option} = {value!r}", why)
    if moe.num_shared_experts < 1:
        raise cannot_export(NAME, "moe.num_shared_experts = 0", "every nemotron_h MoE layer has a shared expert")
    if config.mlp is not None and config.mlp.bias:
        raise cannot_export(NAME, "mlp.bias = True with MoE blocks", "nemotron_h's mlp_bias would bias the experts too")
    return dict(
        n_routed_experts=moe.num_experts,
        num_experts_per_tok=moe.num_experts_per_tok,
        moe_intermediate_size=moe.intermediate_size,
        moe_shared_expert_intermediate_size=moe.num_shared_experts * moe.shared_intermediate_size,
        n_shared_experts=1,
        norm_topk_prob=moe.norm_topk_prob,
        routed_scaling_factor=moe.routed_scaling_factor,
        n_group=moe.num_groups,
        topk_group=moe.topk_groups,
    )


def plan(model: HybridLM) -> Plan:
    config = model.config
    rules = [
        rename("embeddings.weight", "backbone.embeddings.weight"),
        rename("norm_f.weight", "backbone.norm_f.weight"),
        rename("lm_head.weight", "lm_head.weight"),
    ]
    for index, char in enumerate(config.pattern):
        ours, disk = f"layers.{index}", f"backbone.layers.{index}"
        rules.append(rename(f"{ours}.norm.weight", f"{disk}.norm.weight"))
        mixer, disk_mixer = f"{ours}.mixer", f"{disk}.mixer"
        if char == "M":
            rules += mamba2_rules(mixer, disk_mixer, config.mamba2)
        elif char == "*":
            rules += attention_rules(mixer, disk_mixer, config.attention)
        elif char == "-":
            rules += mlp_rules(mixer, disk_mixer, config.mlp, bias=config.mlp.bias)
        elif char == "E":
            rules += [
                rename(f"{mixer}.gate.weight", f"{disk_mixer}.gate.weight"),
                rename(f"{mixer}.gate.e_score_correction_bias", f"{disk_mixer}.gate.e_score_correction_bias"),
                *expert_rules(f"{mixer}.experts", f"{disk_mixer}.experts", config.moe),
                *mlp_rules(f"{mixer}.shared_experts", f"{disk_mixer}.shared_experts", config.moe),
            ]
    return Plan(rules, _canonical)


def _canonical(key: str) -> str | None:
    if key.startswith("mtp."):  # multi-token-prediction heads: not used for generation
        return None
    if key.startswith("model."):  # the in-memory prefix of transformers 5.x
        return "backbone." + key.removeprefix("model.")
    return key


FAMILY = Family(NAME, (NAME,), ARCHITECTURE, "M*-E", config_from_hf, config_to_hf, plan)
