"""The models an ablation compares: layer patterns, and widths that give them equal parameter counts.

Every model is built from debug-tiny's sub-configs, whose sequence mixers keep one state size:
Mamba-2 4 heads x 16 x 16 (state_size) = 1024 values per sequence, Gated DeltaNet 4 value heads x
16 (key) x 16 (value) = 1024, Mamba-1 128 channels x 8 = 1024; attention is GQA (4 query heads,
2 KV heads of 16). Patterns hold sequence mixers only (no MLP or MoE blocks): a mixer's own
projections are its feed-forward capacity here, as in the Mamba-2 paper's hybrid ablation, and an
FFN block would add a fourth thing that differs between variants. The inner sizes stay fixed, so
parameters are linear in the width (hidden_size) and each variant's width is solved from two counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from hybridlm.accounting import count_params
from hybridlm.config import HybridConfig
from hybridlm.presets import get_preset

ATTENTION = "*"
MIXER_NAMES = {"M": "Mamba-2", "G": "Gated DeltaNet", "m": "Mamba-1"}
MAX_PARAM_MISMATCH = 0.02  # the widest relative gap from the reference parameter count allowed


@dataclass(frozen=True)
class Variant:
    name: str  # a short label for tables and plots ("2/8 attn", "first+last", "Mamba-2")
    pattern: str  # one character per block

    @property
    def num_attention(self) -> int:
        return self.pattern.count(ATTENTION)


def evenly_spaced(num_attention: int, num_blocks: int) -> list[int]:
    """Block indices of ``num_attention`` attention blocks spread over ``num_blocks``: the i-th sits at
    floor((i + 1/2) * n / k), the middle of the i-th of k equal segments (1 of 8 -> 4; 2 of 8 -> 2, 6)."""
    return [int((i + 0.5) * num_blocks / num_attention) for i in range(num_attention)]


def pattern_with_attention(positions: list[int], num_blocks: int, mixer: str = "M") -> str:
    return "".join(ATTENTION if index in positions else mixer for index in range(num_blocks))


def ratio_variants(num_blocks: int = 8, mixer: str = "M") -> list[Variant]:
    """0, 1, 2, 4, ... attention blocks (powers of two up to all) of ``num_blocks``, evenly spaced."""
    counts = [0] + [2**i for i in range(num_blocks.bit_length()) if 2**i < num_blocks] + [num_blocks]
    variants = []
    for k in counts:
        positions = evenly_spaced(k, num_blocks) if k else []
        variants.append(Variant(f"{k}/{num_blocks} attn", pattern_with_attention(positions, num_blocks, mixer)))
    return variants


def placement_variants(num_blocks: int = 8, num_attention: int = 2, mixer: str = "M") -> list[Variant]:
    """The same number of attention blocks placed first, last, first+last, evenly spaced and in the middle."""
    k, n = num_attention, num_blocks
    if not 2 <= k <= n // 2:
        raise ValueError(f"placement needs 2 <= attention blocks <= blocks / 2 ({n // 2}), got {k}")
    middle = (n - k) // 2
    placements = {
        "first": list(range(k)),
        "last": list(range(n - k, n)),
        "first+last": list(range(k // 2)) + list(range(n - (k - k // 2), n)),
        "evenly spaced": evenly_spaced(k, n),
        "middle": list(range(middle, middle + k)),
    }
    return [Variant(name, pattern_with_attention(positions, n, mixer)) for name, positions in placements.items()]


def mixer_variants(num_blocks: int = 4, with_attention: bool = True) -> list[Variant]:
    """Mamba-2, Gated DeltaNet and Mamba-1, each alone and (``with_attention``) with one attention block
    in the middle of the stack."""
    variants = [Variant(name, char * num_blocks) for char, name in MIXER_NAMES.items()]
    if with_attention:
        position = evenly_spaced(1, num_blocks)
        variants += [
            Variant(f"{name} + attn", pattern_with_attention(position, num_blocks, char))
            for char, name in MIXER_NAMES.items()
        ]
    return variants


def model_config(pattern: str, hidden_size: int, vocab_size: int) -> HybridConfig:
    """debug-tiny's blocks at ``hidden_size``. The Mamba-2 and Gated DeltaNet scans run in one or two chunks at
    these lengths; Mamba-1's chunked scan holds [B, L, L, channels, state] per chunk, and 4-token chunks trained
    a 2-block model 1.4x faster than debug-tiny's 8 (180 vs 247 ms a step, T=32, batch 32, 2 CPU threads)."""
    return get_preset(
        "debug-tiny",
        name=f"ablation-{pattern}",
        pattern=pattern,
        hidden_size=hidden_size,
        vocab_size=vocab_size,
        mamba2={"chunk_size": 32},
        gdn={"chunk_size": 32},
        mamba={"chunk_size": 4},
    )


def matched_width(pattern: str, vocab_size: int, target_params: int) -> int:
    """The width whose model of ``pattern`` has the parameter count closest to ``target_params``.

    Parameters are a * width + b (every tensor has one dimension of width or none), so two counts give
    a and b; the result is checked against MAX_PARAM_MISMATCH with ``count_params`` itself."""
    low, high = (count_params(model_config(pattern, width, vocab_size)).total for width in (64, 128))
    slope = (high - low) / 64
    width = max(8, round(64 + (target_params - low) / slope))
    found = count_params(model_config(pattern, width, vocab_size)).total
    if abs(found - target_params) > MAX_PARAM_MISMATCH * target_params:
        raise ValueError(
            f"pattern {pattern!r}: the closest width ({width}) gives {found:,} parameters, more than "
            f"{MAX_PARAM_MISMATCH:.0%} from the reference {target_params:,}; use a larger --width"
        )
    return width


@dataclass(frozen=True)
class SizedVariant:
    variant: Variant
    hidden_size: int
    num_params: int

    def config(self, vocab_size: int) -> HybridConfig:
        return model_config(self.variant.pattern, self.hidden_size, vocab_size)


def equal_parameter_models(variants: list[Variant], reference_width: int, vocab_size: int) -> list[SizedVariant]:
    """Each variant at the width that matches the first variant's parameters at ``reference_width``."""
    target = count_params(model_config(variants[0].pattern, reference_width, vocab_size)).total
    sized = []
    for variant in variants:
        width = reference_width if variant is variants[0] else matched_width(variant.pattern, vocab_size, target)
        sized.append(SizedVariant(variant, width, count_params(model_config(variant.pattern, width, vocab_size)).total))
    return sized
