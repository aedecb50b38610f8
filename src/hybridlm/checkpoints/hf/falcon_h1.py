"""falcon_h1: TII Falcon-H1 (``FalconH1ForCausalLM``), docs/hf-families.md §2.6.

Each decoder layer is two of our blocks: ``P`` (Mamba-2 and attention side by side on the output of
``input_layernorm``, summed) then ``-`` (SwiGLU ``feed_forward`` after ``pre_ff_layernorm``).

Falcon-H1's muP multipliers are all scalars (or per-row-block scalars) on linear maps, so they are
folded into the weights at load and divided back out at save (``plan.scaled``); the original values
stay in ``config.extra["folded_multipliers"]`` so that an export writes them back. The formulas,
from transformers 5.23 ``models/falcon_h1/modeling_falcon_h1.py``:

- Mamba-2 (``FalconH1Mixer.forward``): ``zxbcdt = in_proj(x · ssm_in_multiplier) ⊙ mup_vector``,
  where ``mup_vector`` (``compute_mup_vector``, never on disk) is ``ssm_multipliers = [m_z, m_x,
  m_B, m_C, m_dt]`` over the ``in_proj`` rows ``[z (I) | x (I) | B (G·N) | C (G·N) | dt (nh)]``; the
  x, B, C rows are scaled *before* the conv, so scaling the rows is exact. The padding mask is
  applied to ``x`` before ``ssm_in_multiplier`` (a product, so the order is immaterial). Hence
  ``in_proj.weight`` rows × ``ssm_in_multiplier · m_block``, and ``in_proj.bias`` (``mamba_proj_bias``)
  rows × ``m_block`` only (the input scale does not reach the bias).
- ``FalconH1DecoderLayer.forward``: ``mamba(n) · ssm_out_multiplier`` → ``out_proj.weight`` and
  ``out_proj.bias`` (``projectors_bias``) × ``ssm_out_multiplier``.
- ``self_attn(n · attention_in_multiplier) · attention_out_multiplier``, and in
  ``FalconH1Attention.forward`` ``k = k_proj(·) · key_multiplier`` (before RoPE; RoPE is linear):
  ``q/k/v_proj.weight`` × ``attention_in_multiplier`` (the input scale, so not the biases),
  ``k_proj.weight`` and ``k_proj.bias`` also × ``key_multiplier``, ``o_proj.weight`` and ``o_proj.bias``
  × ``attention_out_multiplier``.
- ``FalconH1MLP.forward``: ``down(up(n) ⊙ silu(gate(n) · gate_multiplier)) · down_multiplier`` with
  ``mlp_multipliers = [gate_multiplier, down_multiplier]``: ``gate_proj`` weight and bias ×
  ``gate_multiplier``, ``down_proj`` weight and bias × ``down_multiplier``.
- ``embed_tokens(ids) · embedding_multiplier`` → ``HybridConfig.embedding_multiplier`` (not folded:
  the embeddings may be tied to ``lm_head``); ``lm_head(h) · lm_head_multiplier`` →
  ``logits_scaling = 1 / lm_head_multiplier`` (we divide).

The rest: gated norm G2 (``mamba_rms_norm``: grouped by ``mamba_n_groups``, gate before or after the
norm by ``mamba_norm_before_gate``) or G3 (no norm, ``y · silu(z)``, no ``norm.weight`` on disk);
dt clamped to ``time_step_limit``; attention ``head_dim`` from config.json if there, else
hidden / heads, full RoPE (the default RoPE ignores ``partial_rotary_factor``), softmax scale
``head_dim^-0.5``; every RMSNorm uses ``rms_norm_eps``.

Known limits. Folding rounds each scaled weight once more: exact to round-off in fp32, but a bf16
checkpoint loaded in bf16 and saved again has some entries one bf16 step off. With
``mamba_proj_bias`` and a left-padded batch, transformers masks the mixer *input*, so its pad
positions still carry ``in_proj.bias`` into the conv window of the first real tokens, while our
Mamba-2 zeroes the conv input there (logits of real tokens differ by ~5e-2 on the tiny model); the
published Falcon-H1 checkpoints have no ``in_proj`` bias.
"""

from __future__ import annotations

import math
from typing import Any

from hybridlm.checkpoints.hf.common import (
    Family,
    HFConfig,
    cannot_export,
    check_attention,
    check_pairs,
    common_fields,
    common_to_hf,
    ignoring_tied_head,
    mamba2_from_hf,
    outer_rules,
    paired_layers,
    real_number,
    rope,
)
from hybridlm.checkpoints.plan import Plan, scaled
from hybridlm.config import AttentionConfig, HybridConfig, MLPConfig
from hybridlm.model import HybridLM

NAME = "falcon_h1"
ARCHITECTURE = "FalconH1ForCausalLM"
# the multipliers folded into the weights, with the values that fold nothing
NEUTRAL_MULTIPLIERS: dict[str, Any] = {
    "ssm_in_multiplier": 1.0,
    "ssm_multipliers": [1.0, 1.0, 1.0, 1.0, 1.0],  # [z, x, B, C, dt] rows of in_proj
    "ssm_out_multiplier": 1.0,
    "attention_in_multiplier": 1.0,
    "key_multiplier": 1.0,
    "attention_out_multiplier": 1.0,
    "mlp_multipliers": [1.0, 1.0],  # [gate_proj, down_proj]
}


def _multipliers(cfg: HFConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, neutral in NEUTRAL_MULTIPLIERS.items():
        value = cfg.get(key, neutral)
        if isinstance(neutral, list):
            if not isinstance(value, (list, tuple)) or len(value) != len(neutral):
                raise ValueError(f"{cfg.path}: {key} = {value!r}; expected a list of {len(neutral)} numbers")
            out[key] = [real_number(v, f"{key}[{i}]", cfg.path) for i, v in enumerate(value)]
        else:
            out[key] = cfg.number(key, neutral)
    return out


def config_from_hf(cfg: HFConfig) -> HybridConfig:
    num_layers = cfg.integer("num_hidden_layers")
    hidden = cfg.integer("hidden_size")
    cfg.expect("hidden_act", ("silu",), "silu", "hybridlm's Mamba-2 conv and SwiGLU use silu")
    in_bias, out_bias = cfg.flag("mamba_proj_bias", False), cfg.flag("projectors_bias", False)
    if in_bias != out_bias:
        raise ValueError(
            f"{cfg.path}: mamba_proj_bias = {in_bias} with projectors_bias = {out_bias} is not supported: "
            "hybridlm's Mamba-2 has a bias on both in_proj and out_proj or on neither"
        )

    heads = cfg.integer("num_attention_heads", 32)
    theta, _ = rope(cfg)  # FalconH1RotaryEmbedding's default RoPE rotates the whole head
    attention = AttentionConfig(
        num_heads=heads,
        num_kv_heads=cfg.integer("num_key_value_heads", heads),
        head_dim=cfg.integer("head_dim") if cfg.get("head_dim") is not None else hidden // heads,
        rope_theta=theta,
        bias=cfg.flag("attention_bias", False),
    )

    has_d_ssm = cfg.get("mamba_d_ssm") is not None
    inner = cfg.integer("mamba_d_ssm") if has_d_ssm else int(cfg.number("mamba_expand", 2) * hidden)
    mamba2 = mamba2_from_hf(
        cfg,
        inner,
        f"the Mamba inner size {inner} (mamba_d_ssm, else mamba_expand x hidden_size)",
        has_gated_norm=cfg.flag("mamba_rms_norm", False),
        norm_before_gate=cfg.flag("mamba_norm_before_gate", True),
    )
    lm_head_multiplier = cfg.number("lm_head_multiplier", 1.0)
    if lm_head_multiplier == 0.0:
        raise cfg.unsupported("lm_head_multiplier", "it zeroes every logit")
    fields = common_fields(cfg)
    fields["extra"]["folded_multipliers"] = _multipliers(cfg)
    return HybridConfig(
        pattern="P-" * num_layers,
        attention=attention,
        mamba2=mamba2,
        mlp=MLPConfig(cfg.integer("intermediate_size", 14336), "swiglu", bias=cfg.flag("mlp_bias", False)),
        norm_eps=cfg.number("rms_norm_eps", 1e-5),
        tie_word_embeddings=cfg.flag("tie_word_embeddings", False),
        embedding_multiplier=cfg.number("embedding_multiplier", 1.0),
        logits_scaling=1.0 / lm_head_multiplier,
        num_hidden_layers=num_layers,
        **fields,
    )


def config_to_hf(config: HybridConfig) -> dict[str, Any]:
    check_pairs(config, NAME, "P", "-")
    if config.residual_multiplier != 1.0:
        raise cannot_export(NAME, f"residual_multiplier = {config.residual_multiplier}", "falcon_h1 has none")
    if config.is_norm_zero_centered:
        raise cannot_export(NAME, "is_norm_zero_centered = True", "falcon_h1 norms scale by w")
    a = check_attention(config, NAME, has_qk_norm=False, has_output_gate=False, partial_rotary_factor=1.0)
    if a.rope_theta is None:
        raise cannot_export(NAME, "attention.rope_theta = None", "falcon_h1 attention always uses RoPE")
    if a.softmax_scale is not None and not math.isclose(a.softmax_scale, a.head_dim**-0.5):
        raise cannot_export(NAME, f"attention.softmax_scale = {a.softmax_scale}", "falcon_h1 scales by head_dim^-0.5")
    mlp = config.mlp
    if mlp.activation != "swiglu":
        raise cannot_export(NAME, f"mlp.activation = {mlp.activation!r}", "falcon_h1's feed_forward is SwiGLU")
    m = config.mamba2
    out = common_to_hf(config, NAME, ARCHITECTURE)
    out.update(
        num_hidden_layers=len(config.pattern) // 2,
        rms_norm_eps=config.norm_eps,
        hidden_act="silu",
        num_attention_heads=a.num_heads,
        num_key_value_heads=a.num_kv_heads,
        head_dim=a.head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta},
        attention_bias=a.bias,
        intermediate_size=mlp.intermediate_size,
        mlp_bias=mlp.bias,
        mamba_d_ssm=m.intermediate_size,
        mamba_n_heads=m.num_heads,
        mamba_d_head=m.head_dim,
        mamba_n_groups=m.num_groups,
        mamba_d_state=m.state_size,
        mamba_d_conv=m.conv_kernel,
        mamba_chunk_size=m.chunk_size,
        mamba_conv_bias=m.use_conv_bias,
        mamba_proj_bias=m.use_bias,
        projectors_bias=m.use_bias,
        mamba_rms_norm=m.has_gated_norm,
        mamba_norm_before_gate=m.norm_before_gate,
        time_step_limit=list(m.time_step_limit),
        embedding_multiplier=config.embedding_multiplier,
        lm_head_multiplier=1.0 / config.logits_scaling,
        **folded_multipliers(config),
    )
    return out


def folded_multipliers(config: HybridConfig) -> dict[str, Any]:
    """The multipliers folded into this model's weights (all 1 for a model not read from falcon_h1)."""
    return {**NEUTRAL_MULTIPLIERS, **config.extra.get("folded_multipliers", {})}


def plan(model: HybridLM) -> Plan:
    config = model.config
    m, a = config.mamba2, config.attention
    mult = folded_multipliers(config)
    ssm_in = mult["ssm_in_multiplier"]
    m_z, m_x, m_b, m_c, m_dt = mult["ssm_multipliers"]
    inner, group_state = m.intermediate_size, m.num_groups * m.state_size
    row_blocks = [(inner, m_z), (inner, m_x), (group_state, m_b), (group_state, m_c), (m.num_heads, m_dt)]
    attention_in, key = mult["attention_in_multiplier"], mult["key_multiplier"]
    gate, down = mult["mlp_multipliers"]
    # (our name, disk name, factor): the weight rules, then the bias rules where the model has biases
    mamba_weights = [("in_proj.weight", [(rows, ssm_in * f) for rows, f in row_blocks])]
    mamba_weights += [("out_proj.weight", mult["ssm_out_multiplier"])]
    mamba_weights += [(n, 1.0) for n in ("conv1d.weight", "dt_bias", "A_log", "D")]
    if m.has_gated_norm:
        mamba_weights.append(("norm.weight", 1.0))
    if m.use_conv_bias:
        mamba_weights.append(("conv1d.bias", 1.0))
    if m.use_bias:
        mamba_weights += [("in_proj.bias", row_blocks), ("out_proj.bias", mult["ssm_out_multiplier"])]
    attention = [("q_proj", attention_in, 1.0), ("k_proj", attention_in * key, key), ("v_proj", attention_in, 1.0)]
    attention.append(("o_proj", mult["attention_out_multiplier"], mult["attention_out_multiplier"]))
    feed_forward = [("gate_proj", gate), ("up_proj", 1.0), ("down_proj", down)]

    rules = outer_rules(config, final_norm="final_layernorm")
    for layer in paired_layers(config, pre_ffn_norm="pre_ff_layernorm"):
        disk, parallel, ffn = layer.disk, layer.mixer, layer.ffn
        rules.append(layer.input_norm)
        rules += [scaled(f"{parallel}.mamba.{n}", f"{disk}.mamba.{n}", f) for n, f in mamba_weights]
        for proj, weight_factor, bias_factor in attention:
            ours, theirs = f"{parallel}.self_attn.{proj}", f"{disk}.self_attn.{proj}"
            rules.append(scaled(f"{ours}.weight", f"{theirs}.weight", weight_factor))
            if a.bias:
                rules.append(scaled(f"{ours}.bias", f"{theirs}.bias", bias_factor))
        rules.append(layer.pre_ffn_norm)
        for proj, factor in feed_forward:
            ours, theirs = f"{ffn}.{proj}", f"{disk}.feed_forward.{proj}"
            rules.append(scaled(f"{ours}.weight", f"{theirs}.weight", factor))
            if config.mlp.bias:
                rules.append(scaled(f"{ours}.bias", f"{theirs}.bias", factor))
    return Plan(rules, ignoring_tied_head(config))


FAMILY = Family(NAME, (NAME,), ARCHITECTURE, "P-", config_from_hf, config_to_hf, plan)
