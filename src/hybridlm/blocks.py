"""The one registry of block facts: what each layer-pattern character means.

Everything that asks "what is this character" reads ``BLOCKS``: config validation (which
sub-configs a block needs), the model (which module to build, whether it mixes the sequence and
takes a cache slot, whether it routes tokens to experts), accounting (parameters, state bytes,
context FLOPs, answered by the module class from the config alone), the cache, and the trace
(layer-type names). Adding a block type is one entry here and one module in ``layers/`` that
subclasses ``layers.base.BlockModule``. (vLLM keeps the same kind of table for Nemotron-H:
``ALL_DECODER_LAYER_TYPES``.)
"""

from __future__ import annotations

from dataclasses import dataclass

from hybridlm.layers.attention import Attention
from hybridlm.layers.base import BlockModule
from hybridlm.layers.gated_deltanet import GatedDeltaNetMixer
from hybridlm.layers.mamba import MambaMixer
from hybridlm.layers.mamba2 import Mamba2Mixer
from hybridlm.layers.mlp import MLP
from hybridlm.layers.moe import MoE
from hybridlm.layers.parallel import ParallelMixer


@dataclass(frozen=True)
class BlockSpec:
    char: str  # the layer-pattern character
    layer_type: str  # the name traces, reports and `info` use
    sub_configs: tuple[str, ...]  # HybridConfig fields the block is built from
    module: type[BlockModule]  # builds itself from the config; counts its parameters and state
    mixes_sequence: bool  # True: a sequence mixer that takes a cache slot; False: acts on each token alone
    routes_experts: bool = False  # True: the module exposes last_tokens_per_expert / last_aux_loss
    description: str = ""


BLOCKS: dict[str, BlockSpec] = {
    spec.char: spec
    for spec in (
        BlockSpec("M", "mamba2", ("mamba2",), Mamba2Mixer, True, description="Mamba-2 mixer (SSD)"),
        BlockSpec("G", "gdn", ("gdn",), GatedDeltaNetMixer, True, description="Gated DeltaNet mixer"),
        BlockSpec("*", "attention", ("attention",), Attention, True, description="GQA attention"),
        BlockSpec("m", "mamba", ("mamba",), MambaMixer, True, description="Mamba-1 selective-scan mixer (Jamba)"),
        BlockSpec("-", "mlp", ("mlp",), MLP, False, description="dense MLP"),
        BlockSpec("E", "moe", ("moe",), MoE, False, routes_experts=True, description="Mixture-of-Experts FFN"),
        BlockSpec(
            "P",
            "parallel",
            ("mamba2", "attention"),
            ParallelMixer,
            True,
            description="Mamba-2 and attention in parallel on one input (Falcon-H1)",
        ),
    )
}

# Every layer-type name a recorded trace can hold for a block, in registry order.
LAYER_TYPES: tuple[str, ...] = tuple(spec.layer_type for spec in BLOCKS.values())
SEQUENCE_MIXER_CHARS: frozenset[str] = frozenset(c for c, spec in BLOCKS.items() if spec.mixes_sequence)


def block_spec(char: str) -> BlockSpec:
    """The spec of one pattern character; a ValueError naming the known characters otherwise."""
    spec = BLOCKS.get(char)
    if spec is None:
        raise ValueError(f"{char!r} is not a block type; expected one of {', '.join(repr(c) for c in BLOCKS)}")
    return spec


def layer_type_name(char: str) -> str:
    """'M' -> 'mamba2', 'E' -> 'moe', ... (the names traces and reports use)."""
    return block_spec(char).layer_type
