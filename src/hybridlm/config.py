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
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

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

    def validate(self, path: str = "attention") -> None:
        check_field_types(self, path)
        require_positive(self, path, "num_heads", "num_kv_heads", "head_dim")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{path}.num_heads ({self.num_heads}) must be a multiple of {path}.num_kv_heads ({self.num_kv_heads})"
            )
        factor = self.partial_rotary_factor
        require(0.0 < factor <= 1.0, f"{path}.partial_rotary_factor", "in (0, 1]", factor)
        if self.rope_theta is not None:
            require(
                self.rope_theta > 0.0,
                f"{path}.rope_theta",
                "positive (or null for no rotary embedding)",
                self.rope_theta,
            )
            if self.rotary_dim < 2 or self.rotary_dim % 2:
                raise ValueError(
                    f"{path}.partial_rotary_factor ({factor}) x {path}.head_dim ({self.head_dim}) gives a rotary dim "
                    f"of {self.rotary_dim}; it must be even and at least 2 (rotary pairs dims i and i + dim / 2)"
                )
        if self.softmax_scale is not None:
            require(
                self.softmax_scale > 0.0,
                f"{path}.softmax_scale",
                "positive (or null for head_dim ** -0.5)",
                self.softmax_scale,
            )


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

    def validate(self, path: str = "mamba2") -> None:
        check_field_types(self, path, may_be_infinite=("time_step_limit",))
        require_positive(self, path, "num_heads", "head_dim", "state_size", "num_groups", "conv_kernel", "chunk_size")
        if self.num_heads % self.num_groups:
            raise ValueError(
                f"{path}.num_heads ({self.num_heads}) must be a multiple of {path}.num_groups ({self.num_groups})"
            )
        # dt is initialised log-uniformly in [time_step_min, time_step_max] (mamba_ssm), then floored
        require(self.time_step_min > 0.0, f"{path}.time_step_min", "positive", self.time_step_min)
        require(
            self.time_step_max >= self.time_step_min,
            f"{path}.time_step_max",
            f">= time_step_min ({self.time_step_min})",
            self.time_step_max,
        )
        require(self.time_step_floor >= 0.0, f"{path}.time_step_floor", ">= 0", self.time_step_floor)
        low, high = self.time_step_limit
        require(
            0.0 <= low <= high and not math.isinf(low),
            f"{path}.time_step_limit",
            "[low, high] with 0 <= low <= high (high may be inf)",
            list(self.time_step_limit),
        )


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

    def validate(self, path: str = "mamba") -> None:
        check_field_types(self, path)
        require_positive(self, path, "intermediate_size", "state_size", "conv_kernel", "dt_rank", "chunk_size")


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

    def validate(self, path: str = "gdn") -> None:
        check_field_types(self, path)
        require_positive(
            self,
            path,
            "num_key_heads",
            "num_value_heads",
            "key_head_dim",
            "value_head_dim",
            "conv_kernel",
            "chunk_size",
        )
        if self.num_value_heads % self.num_key_heads:  # value head h reads key head h // (value / key heads)
            raise ValueError(
                f"{path}.num_value_heads ({self.num_value_heads}) must be a multiple of "
                f"{path}.num_key_heads ({self.num_key_heads})"
            )


Activation = Literal["swiglu", "relu2"]


@dataclass
class MLPConfig:
    intermediate_size: int
    activation: Activation = "swiglu"
    bias: bool = False

    def validate(self, path: str = "mlp") -> None:
        check_field_types(self, path)
        require_positive(self, path, "intermediate_size")


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

    def validate(self, path: str = "moe") -> None:
        check_field_types(self, path)
        require_positive(self, path, "num_experts", "intermediate_size", "num_groups")
        top_k, experts = self.num_experts_per_tok, self.num_experts
        if not 1 <= top_k <= experts:
            raise ValueError(f"{path}.num_experts_per_tok ({top_k}) must be in 1..num_experts ({experts})")
        if experts % self.num_groups:
            raise ValueError(f"{path}.num_groups ({self.num_groups}) must divide {path}.num_experts ({experts})")
        groups = self.topk_groups
        require(1 <= groups <= self.num_groups, f"{path}.topk_groups", f"in 1..num_groups ({self.num_groups})", groups)
        left = groups * (experts // self.num_groups)  # grouped top-k picks only from the kept groups
        require(top_k <= left, f"{path}.num_experts_per_tok", f"<= the {left} experts of the kept topk_groups", top_k)
        require(
            self.routed_scaling_factor > 0.0, f"{path}.routed_scaling_factor", "positive", self.routed_scaling_factor
        )
        require(self.num_shared_experts >= 0, f"{path}.num_shared_experts", ">= 0", self.num_shared_experts)
        if self.num_shared_experts:
            require_positive(self, path, "shared_intermediate_size")
        else:
            require(
                self.shared_intermediate_size >= 0,
                f"{path}.shared_intermediate_size",
                ">= 0",
                self.shared_intermediate_size,
            )
            require(
                not self.has_shared_expert_gate,
                f"{path}.has_shared_expert_gate",
                "false when num_shared_experts is 0 (there is no shared output to gate)",
                self.has_shared_expert_gate,
            )
        require(self.aux_loss_coef >= 0.0, f"{path}.aux_loss_coef", ">= 0", self.aux_loss_coef)
        require(self.z_loss_coef >= 0.0, f"{path}.z_loss_coef", ">= 0", self.z_loss_coef)


SubConfig = AttentionConfig | Mamba2Config | GatedDeltaNetConfig | MLPConfig | MoEConfig | MambaConfig

_SUB_CONFIGS: dict[str, type[SubConfig]] = {
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
                setattr(self, key, _sub_config_from_dict(key, cls, value))
        self.validate()

    # -- validation ------------------------------------------------------------------------------
    def validate(self) -> None:
        """A ValueError naming the first field (as a dotted path) that is the wrong type, out of range or
        inconsistent with another; sub-configs of blocks the pattern does not use are checked too (they
        are saved with the config and a later pattern may use them)."""
        check_field_types(self, "")
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
        require_positive(self, "", "vocab_size", "hidden_size", "max_position_embeddings")
        require(self.norm_eps > 0.0, "norm_eps", "positive", self.norm_eps)
        require(self.initializer_range >= 0.0, "initializer_range", ">= 0", self.initializer_range)
        for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
            require(getattr(self, name) > 0.0, name, "positive", getattr(self, name))
        if self.num_hidden_layers is not None:
            require_positive(self, "", "num_hidden_layers")
        for key in _SUB_CONFIGS:
            sub_config = getattr(self, key)
            if sub_config is not None:
                sub_config.validate(key)

    # -- views -----------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.pattern)

    def block_counts(self) -> dict[str, int]:
        """Blocks per layer type name, in pattern-grammar order: {'mamba2': 23, 'moe': 23, ...}."""
        return {layer_type_name(c): self.pattern.count(c) for c in BLOCKS if c in self.pattern}

    # -- constructors and serialisation ------------------------------------------------------------
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
        """A config from plain JSON values (sub-configs as objects, inf as "inf"); a ValueError names
        any unknown, missing, mistyped or out-of-range field by its dotted path."""
        if not isinstance(data, dict):
            raise ValueError(f"a HybridConfig must be a JSON object of fields, got {type(data).__name__}")
        fields = dataclasses.fields(cls)
        unknown = sorted(set(data) - {f.name for f in fields})
        if unknown:
            raise ValueError(f"unknown HybridConfig field(s): {', '.join(unknown)}")
        _require_present(cls, data, "")
        data = {key: _decode_json_value(cls, key, value) for key, value in data.items()}
        for key, sub_cls in _SUB_CONFIGS.items():
            if data.get(key) is not None:
                data[key] = _sub_config_from_dict(key, sub_cls, data[key])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> HybridConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"not valid JSON ({error})") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> HybridConfig:
        """The config saved at ``path``; a bad one is a ValueError that starts with the file name.

        A missing file stays a FileNotFoundError (as ``open`` raises it); a directory or a file that is
        not UTF-8 text is a ValueError naming the file."""
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"{path}: is a directory, not a config file (a JSON object of HybridConfig fields)")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{path}: not a text file, so not a JSON config ({error.reason} at byte {error.start})"
            ) from None
        try:
            return cls.from_json(text)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


# -- field checks ----------------------------------------------------------------------------------
# Every dataclass field is checked against its annotation (JSON gives "64", "false" and 1.5 as easily
# as 64, false and 1), then against the ranges the layers need to build and run.


def require(is_ok: bool, path: str, expected: str, value: Any) -> None:
    if not is_ok:
        _fail(path, expected, value)


def require_positive(config: Any, path: str, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        require(value > 0, _join(path, name), "positive", value)


def check_field_types(config: Any, path: str, may_be_infinite: tuple[str, ...] = ()) -> None:
    """Each field of the dataclass ``config`` against its annotation: a bool is a real bool, an int is
    not a bool, a float accepts an int but is never NaN (nor inf unless the field is listed)."""
    for name, hint in _field_hints(type(config)).items():
        _check_value(getattr(config, name), hint, _join(path, name), name in may_be_infinite)


def _fail(path: str, expected: str, value: Any) -> NoReturn:
    raise ValueError(f"{path} must be {expected}, got {value!r}")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_value(value: Any, hint: Any, path: str, may_be_infinite: bool) -> None:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        (hint,) = [arg for arg in args if arg is not type(None)]  # every optional field has one other type
        return _check_value(value, hint, path, may_be_infinite)
    if origin is Literal:
        require(isinstance(value, str) and value in args, path, f"one of {', '.join(map(repr, args))}", value)
    elif origin is tuple:
        expected = f"a list of {len(args)} numbers"
        require(isinstance(value, tuple) and len(value) == len(args), path, expected, value)
        for index, (item, item_hint) in enumerate(zip(value, args, strict=True)):
            _check_value(item, item_hint, f"{path}[{index}]", may_be_infinite)
    elif origin is dict:
        require(isinstance(value, dict), path, "an object", value)
    elif hint is bool:
        require(isinstance(value, bool), path, "a bool (true or false)", value)
    elif hint is int:
        require(isinstance(value, int) and not isinstance(value, bool), path, "an integer", value)
    elif hint is float:
        require(isinstance(value, (int, float)) and not isinstance(value, bool), path, "a number", value)
        require(not math.isnan(value), path, "a number", value)
        require(may_be_infinite or not math.isinf(value), path, "finite", value)
    elif hint is str:
        require(isinstance(value, str), path, "a string", value)
    elif dataclasses.is_dataclass(hint):
        require(isinstance(value, hint), path, f"a {hint.__name__} (or an object of its fields)", value)
    elif hint is not Any:
        raise TypeError(f"no check for the annotation {hint!r} of {path}")  # a new field type: add it above


def _require_present(cls: type, data: dict[str, Any], path: str) -> None:
    required = [f.name for f in dataclasses.fields(cls) if _is_required(f)]
    for name in required:
        if name not in data:
            raise ValueError(f"{_join(path, name)} is missing; {path or cls.__name__} needs {', '.join(required)}")


def _is_required(f: dataclasses.Field) -> bool:
    """No default value and no default factory (``extra`` has a factory: it is optional)."""
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _sub_config_from_dict(key: str, cls: type[SubConfig], data: Any) -> SubConfig:
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{key} must be an object of {cls.__name__} fields (or null), got {data!r}")
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown field(s) in '{key}' sub-config: {', '.join(f'{key}.{name}' for name in unknown)}")
    _require_present(cls, data, key)
    return cls(**{name: _decode_json_value(cls, name, value) for name, value in data.items()})


def _decode_json_value(cls: type, name: str, value: Any) -> Any:
    """JSON has no inf (to_json writes "inf") and no tuple (it writes a list)."""
    hint = _field_hints(cls)[name]
    if typing.get_origin(hint) is tuple and isinstance(value, list):
        return tuple(_decode_float(item) for item in value)
    if float in (hint, *typing.get_args(hint)):
        return _decode_float(value)
    return value


def _decode_float(value: Any) -> Any:
    if value == "inf":
        return math.inf
    if value == "-inf":
        return -math.inf
    return value
