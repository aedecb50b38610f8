"""What the Hugging Face families share: reading config.json fields, RoPE and layer-type spellings,
the Bamba-style ``mamba_*`` fields, the tensor rules of the blocks several families have in common
(attention, Mamba-2, Mamba-1, MLPs, stacked experts), and the decoder-layer skeleton of the families
whose layer is a mixer block then an FFN block.

Rule builders take our module prefix (``layers.3.mixer``) and the checkpoint's (``model.layers.1.mamba``);
the porting spec they follow is ``docs/hf-families.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybridlm.checkpoints.plan import Plan, Rule, rename, stacked, stacked_gate_up
from hybridlm.config import AttentionConfig, HybridConfig, Mamba2Config, MambaConfig, MLPConfig, MoEConfig
from hybridlm.model import HybridLM

# configuration_utils._LEGACY_LAYER_TYPE_REMAP: what transformers 5.23 renames on load
LEGACY_LAYER_TYPES = {"mamba": "linear_attention", "attention": "full_attention"}
_SPECIAL_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


@dataclass(frozen=True)
class Family:
    """One Hugging Face model family: its config.json both ways and its tensor plan."""

    name: str  # the model_type written on export
    model_types: tuple[str, ...]  # the model_type values it reads
    architecture: str  # the *ForCausalLM class written on export
    block_types: str  # the pattern characters it can hold
    config_from_hf: Callable[[HFConfig], HybridConfig]
    config_to_hf: Callable[[HybridConfig], dict[str, Any]]
    plan: Callable[[HybridLM], Plan]


def decode_floats(value: Any) -> Any:
    """transformers 5.23 writes inf as {"__float__": "Infinity"}; older files use the bare JSON token."""
    if isinstance(value, dict):
        if set(value) == {"__float__"} and value["__float__"] in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS[value["__float__"]]
        return {k: decode_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_floats(v) for v in value]
    return value


def encode_floats(value: Any) -> Any:
    """The inverse of :func:`decode_floats`, for config.json files we write."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")}
    if isinstance(value, dict):
        return {k: encode_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_floats(v) for v in value]
    return value


_REQUIRED = object()


def real_number(value: Any, field: str, path: Path) -> float:
    """``value`` as a float if it is a JSON number; JSON true/false are numbers to Python and are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{path}: field {field} = {value!r} must be a number")
    return float(value)


def whole_number(value: Any, field: str, path: Path, positive: bool = True) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (1 if positive else 0):
        kind = "a positive integer" if positive else "an integer >= 0"
        raise ValueError(f"{path}: field {field} = {value!r} must be {kind}")
    return value


class HFConfig:
    """A config.json dict plus where it came from, so every error names the file and the field."""

    def __init__(self, data: dict[str, Any], path: Path) -> None:
        self.data = decode_floats(data)
        self.path = path
        _refuse_quoted_numbers(self.data, path)

    def get(self, key: str, default: Any = None) -> Any:
        value = self.data.get(key)
        return default if value is None else value

    def require(self, key: str) -> Any:
        if self.data.get(key) is None:
            raise ValueError(f"{self.path}: field {key!r} is missing")
        return self.data[key]

    def number(self, key: str, default: Any = _REQUIRED) -> float:
        """A real-number field as a float; a bool (``true`` is not 1.0), a list, a string or null is refused."""
        value = self.require(key) if default is _REQUIRED else self.get(key, default)
        return real_number(value, key, self.path)

    def integer(self, key: str, default: Any = _REQUIRED, positive: bool = True) -> int:
        """A count or size: an int (not a bool, not 4.0), positive unless ``positive=False`` (then >= 0)."""
        value = self.require(key) if default is _REQUIRED else self.get(key, default)
        return whole_number(value, key, self.path, positive)

    def flag(self, key: str, default: bool) -> bool:
        """A true/false field; ``"false"`` or 0 is refused rather than read as Python would (``bool("false")``
        is True). A legacy spelling's value may be passed as ``default``."""
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise ValueError(f"{self.path}: field {key!r} = {value!r} must be true or false")
        return value

    def unsupported(self, option: str, why: str) -> ValueError:
        value = self.data.get(option)
        return ValueError(f"{self.path}: {option} = {value!r} is not supported: {why}")

    def expect(self, key: str, allowed: Iterable[Any], default: Any, why: str) -> Any:
        value = self.get(key, default)
        if value not in allowed:
            raise self.unsupported(key, why)
        return value


def _refuse_quoted_numbers(data: dict[str, Any], path: Path, prefix: str = "") -> None:
    """A number written as a string (``"mamba_n_heads": "64"``) would reach the readers' arithmetic as
    text; transformers' own configs never quote numbers, so it is refused naming the field."""
    for key, value in data.items():
        if isinstance(value, dict):
            _refuse_quoted_numbers(value, path, f"{prefix}{key}.")
        elif isinstance(value, str) and not key.startswith("_") and "version" not in key:
            try:
                float(value)
            except ValueError:
                continue
            raise ValueError(f"{path}: field {prefix}{key!s} = {value!r} is a string; write the number without quotes")


def layer_types(cfg: HFConfig, *keys: str) -> list[str] | None:
    """The first of ``keys`` present, with legacy spellings mapped as transformers does."""
    for key in keys:
        value = cfg.get(key)
        if value is not None:
            return [LEGACY_LAYER_TYPES.get(t, t) for t in value]
    return None


def rope(cfg: HFConfig, default_partial: float = 1.0) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from ``rope_parameters`` (5.x), the legacy ``rope_scaling``
    or the top-level fields (4.x); only the default RoPE type is ported.

    A legacy ``rope_scaling`` block wins over ``rope_parameters``, as in transformers 5.23
    (``RotaryEmbeddingConfigMixin.convert_rope_params_to_dict``: ``rope_scaling or rope_parameters``),
    so a YaRN ``rope_scaling`` beside a default ``rope_parameters`` is YaRN, and refused."""
    key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    params = cfg.get(key) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{cfg.path}: {key} = {params!r} must be an object")
    nested = sorted(name for name, value in params.items() if isinstance(value, dict))
    if nested:
        raise ValueError(
            f"{cfg.path}: {key} holds RoPE parameters per layer type ({', '.join(nested)}), which are not supported"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"{cfg.path}: {key}.rope_type = {rope_type!r} is not supported (only 'default' RoPE is ported)"
        )
    values = []
    for field, default in (("rope_theta", 10000.0), ("partial_rotary_factor", default_partial)):
        if field in params:  # present but null is an error, not the default
            values.append(real_number(params[field], f"{key}.{field}", cfg.path))
        else:
            values.append(cfg.number(field, default))
    theta, partial = values
    if not theta > 0 or not 0 < partial <= 1:
        raise ValueError(
            f"{cfg.path}: rope_theta = {theta} and partial_rotary_factor = {partial}: expected theta > 0 and "
            "0 < factor <= 1"
        )
    return theta, partial


def common_fields(cfg: HFConfig) -> dict[str, Any]:
    """HybridConfig fields every family spells the same way."""
    extra: dict[str, Any] = {"hf_model_type": cfg.data.get("model_type")}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if cfg.data.get(key) is not None:
            extra[key] = cfg.data[key]
    return dict(
        vocab_size=cfg.integer("vocab_size"),
        hidden_size=cfg.integer("hidden_size"),
        max_position_embeddings=cfg.integer("max_position_embeddings", 4096),
        initializer_range=cfg.number("initializer_range", 0.02),
        extra=extra,
    )


def common_to_hf(config: HybridConfig, model_type: str, architecture: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "tie_word_embeddings": config.tie_word_embeddings,
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in config.extra:
            out[key] = config.extra[key]
    return out


def mamba2_from_hf(cfg: HFConfig, inner: int, inner_source: str, **fields: Any) -> Mamba2Config:
    """The Mamba-2 of granitemoehybrid and falcon_h1, which spell it as Bamba does (``mamba_n_heads``,
    ``mamba_d_head``, ...) with the same defaults. ``inner`` is the family's channel count and
    ``inner_source`` says where it came from (for the error); ``fields`` are the family's own."""
    num_heads = cfg.integer("mamba_n_heads", 128)
    is_auto = cfg.get("mamba_d_head", "auto") == "auto"  # Bamba's default: the inner size over the heads
    head_dim = inner // num_heads if is_auto else cfg.integer("mamba_d_head")
    if num_heads * head_dim != inner:
        raise ValueError(f"{cfg.path}: mamba_n_heads x mamba_d_head = {num_heads} x {head_dim} != {inner_source}")
    return Mamba2Config(
        num_heads=num_heads,
        head_dim=head_dim,
        state_size=cfg.integer("mamba_d_state", 256),
        num_groups=cfg.integer("mamba_n_groups", 1),
        conv_kernel=cfg.integer("mamba_d_conv", 4),
        chunk_size=cfg.integer("mamba_chunk_size", 256),
        use_conv_bias=cfg.flag("mamba_conv_bias", True),
        use_bias=cfg.flag("mamba_proj_bias", False),
        time_step_limit=time_step_limit(cfg),
        **fields,
    )


def time_step_limit(cfg: HFConfig) -> tuple[float, float]:
    """``time_step_limit`` as (low, high): a list of two numbers (high may be inf)."""
    limit = cfg.get("time_step_limit", [0.0, math.inf])
    is_pair = isinstance(limit, (list, tuple)) and len(limit) == 2
    if not is_pair or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in limit):
        raise ValueError(f"{cfg.path}: field time_step_limit = {limit!r} must be a list [low, high] of two numbers")
    return float(limit[0]), float(limit[1])


def cannot_export(family: str, option: str, why: str) -> ValueError:
    return ValueError(f"cannot export to {family}: {option} — {why}")


def check_no_multipliers(config: HybridConfig, family: str) -> None:
    """Families without embedding, residual or logit multipliers."""
    for option in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
        if getattr(config, option) != 1.0:
            raise cannot_export(family, f"{option} = {getattr(config, option)}", f"{family} has no multipliers")


def check_pairs(config: HybridConfig, family: str, mixers: str, ffns: str) -> None:
    """Families whose decoder layer is a mixer block then an FFN block."""
    pattern = config.pattern
    for index, char in enumerate(pattern):
        allowed = mixers if index % 2 == 0 else ffns
        if char not in allowed:
            raise cannot_export(
                family,
                f"pattern[{index}] = {char!r}",
                f"each {family} layer is one of {' '.join(mixers)} followed by one of {' '.join(ffns)} "
                f"(pattern {pattern!r})",
            )
    if len(pattern) % 2:
        raise cannot_export(family, f"pattern {pattern!r}", f"{family} layers are pairs of blocks: odd length")


def check_plain_moe(config: HybridConfig, family: str, *, scoring: str = "softmax") -> MoEConfig:
    """The softmax-router MoE of Qwen, Granite and Jamba: no expert bias, no groups, no scaling."""
    moe = config.moe
    checks = {
        "moe.activation": (moe.activation, "swiglu"),
        "moe.scoring": (moe.scoring, scoring),
        "moe.use_expert_bias": (moe.use_expert_bias, False),
        "moe.num_groups": (moe.num_groups, 1),
        "moe.routed_scaling_factor": (moe.routed_scaling_factor, 1.0),
    }
    for option, (value, wanted) in checks.items():
        if value != wanted:
            raise cannot_export(family, f"{option} = {value!r}", f"{family} routers need {wanted!r}")
    return moe


def check_attention(config: HybridConfig, family: str, **wanted: Any) -> AttentionConfig:
    attention = config.attention
    for option, value in wanted.items():
        if getattr(attention, option) != value:
            raise cannot_export(
                family, f"attention.{option} = {getattr(attention, option)!r}", f"{family} needs {value!r}"
            )
    return attention


# -- tensor rules of shared blocks -----------------------------------------------------------------


def attention_rules(ours: str, disk: str, attention: AttentionConfig) -> list[Rule]:
    rules = [rename(f"{ours}.{p}_proj.weight", f"{disk}.{p}_proj.weight") for p in "qkvo"]
    if attention.bias:
        rules += [rename(f"{ours}.{p}_proj.bias", f"{disk}.{p}_proj.bias") for p in "qkvo"]
    if attention.has_qk_norm:
        rules += [rename(f"{ours}.{n}_norm.weight", f"{disk}.{n}_norm.weight") for n in "qk"]
    return rules


def mamba2_rules(ours: str, disk: str, mamba2: Mamba2Config) -> list[Rule]:
    names = ["in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight"]
    if mamba2.use_conv_bias:
        names.append("conv1d.bias")
    if mamba2.use_bias:
        names += ["in_proj.bias", "out_proj.bias"]
    return [rename(f"{ours}.{n}", f"{disk}.{n}") for n in names]


def mamba_rules(ours: str, disk: str, mamba: MambaConfig) -> list[Rule]:
    names = ["in_proj.weight", "conv1d.weight", "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "A_log", "D"]
    names += ["out_proj.weight"]
    if mamba.has_inner_norms:
        names += ["dt_layernorm.weight", "b_layernorm.weight", "c_layernorm.weight"]
    if mamba.use_conv_bias:
        names.append("conv1d.bias")
    if mamba.use_bias:
        names += ["in_proj.bias", "out_proj.bias"]
    return [rename(f"{ours}.{n}", f"{disk}.{n}") for n in names]


def mlp_rules(ours: str, disk: str, mlp: MLPConfig | MoEConfig, bias: bool = False) -> list[Rule]:
    projections = ["gate_proj", "up_proj", "down_proj"] if mlp.activation == "swiglu" else ["up_proj", "down_proj"]
    kinds = ["weight", "bias"] if bias else ["weight"]
    return [rename(f"{ours}.{p}.{kind}", f"{disk}.{p}.{kind}") for p in projections for kind in kinds]


def expert_rules(ours: str, disk: str, moe: MoEConfig) -> list[Rule]:
    """Experts written one per key (``{disk}.{e}.up_proj.weight``), read that way or stacked
    (``{disk}.gate_up_proj`` / ``{disk}.up_proj``, ``{disk}.down_proj``: transformers 5.x in memory)."""
    experts = range(moe.num_experts)
    down = stacked(f"{ours}.down_proj", [f"{disk}.{e}.down_proj.weight" for e in experts], f"{disk}.down_proj")
    if moe.activation == "swiglu":
        gate_up = stacked_gate_up(
            f"{ours}.gate_up_proj",
            [f"{disk}.{e}.gate_proj.weight" for e in experts],
            [f"{disk}.{e}.up_proj.weight" for e in experts],
            f"{disk}.gate_up_proj",
        )
        return [gate_up, down]
    up = stacked(f"{ours}.up_proj", [f"{disk}.{e}.up_proj.weight" for e in experts], f"{disk}.up_proj")
    return [up, down]


# -- the decoder layers of the paired families (qwen3_next, granitemoehybrid, jamba, falcon_h1) --------


@dataclass(frozen=True)
class DecoderLayer:
    """Decoder layer ``index`` of a family whose layer is a mixer block then an FFN block
    (:func:`check_pairs`): our blocks 2i and 2i + 1, under ``model.layers.{index}`` on disk."""

    index: int
    mixer_char: str  # pattern[2i]
    ffn_char: str  # pattern[2i + 1]
    disk: str  # model.layers.{i}
    mixer: str  # layers.{2i}.mixer
    ffn: str  # layers.{2i + 1}.mixer
    input_norm: Rule  # layers.{2i}.norm.weight = {disk}.input_layernorm.weight
    pre_ffn_norm: Rule  # layers.{2i + 1}.norm.weight = {disk}.{the family's pre-FFN norm}.weight


def paired_layers(config: HybridConfig, pre_ffn_norm: str) -> Iterator[DecoderLayer]:
    """The decoder layers of a paired family; ``pre_ffn_norm`` is its name for the norm before the FFN
    (``post_attention_layernorm``, ``pre_ff_layernorm``)."""
    pattern = config.pattern
    for index in range(len(pattern) // 2):
        disk, mixer_block, ffn_block = f"model.layers.{index}", f"layers.{2 * index}", f"layers.{2 * index + 1}"
        yield DecoderLayer(
            index=index,
            mixer_char=pattern[2 * index],
            ffn_char=pattern[2 * index + 1],
            disk=disk,
            mixer=f"{mixer_block}.mixer",
            ffn=f"{ffn_block}.mixer",
            input_norm=rename(f"{mixer_block}.norm.weight", f"{disk}.input_layernorm.weight"),
            pre_ffn_norm=rename(f"{ffn_block}.norm.weight", f"{disk}.{pre_ffn_norm}.weight"),
        )


def outer_rules(config: HybridConfig, final_norm: str) -> list[Rule]:
    """The rules around a paired family's decoder layers: ``model.embed_tokens``, the final norm
    (``model.{final_norm}``: ``norm``, ``final_layernorm``) and, unless tied, ``lm_head``."""
    rules = [
        rename("embeddings.weight", "model.embed_tokens.weight"),
        rename("norm_f.weight", f"model.{final_norm}.weight"),
    ]
    if not config.tie_word_embeddings:
        rules.append(rename("lm_head.weight", "lm_head.weight"))
    return rules


def ignoring_tied_head(
    config: HybridConfig, canonical: Callable[[str], str | None] = lambda key: key
) -> Callable[[str], str | None]:
    """``canonical`` (a plan's disk name -> plan name), except that with tied embeddings a stored
    ``lm_head.weight`` is ignored: some writers store the tied head anyway, and transformers ignores it."""
    is_tied = config.tie_word_embeddings

    def canonical_key(key: str) -> str | None:
        return None if is_tied and key == "lm_head.weight" else canonical(key)

    return canonical_key
