"""The short causal convolution's decoding step, shared by the mixers that have one (Mamba-2,
Mamba-1, Gated DeltaNet): the layer's ``nn.Conv1d`` parameters, the slot's rolling state updated
in place, then SiLU."""

from __future__ import annotations

from torch import Tensor, nn

from hybridlm.ops import native


def conv_step(x: Tensor, conv_state: Tensor, conv1d: nn.Conv1d) -> Tensor:
    """x [B, C] (this token's channels) -> silu(conv) [B, C]; ``conv_state`` [B, C, K-1] rolls in place."""
    return native.conv_step_(x, conv_state, conv1d.weight.squeeze(1), conv1d.bias, "silu")
