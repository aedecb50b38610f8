"""The short causal convolution of the mixers that have one (Mamba-2, Mamba-1, Gated DeltaNet): the layer's
``nn.Conv1d`` parameters, then SiLU, with the slot's rolling state of the last K-1 inputs updated in place,
for one decoding token (``conv_step``) or a whole prompt (``conv_sequence``). Both run
``native.causal_conv_``, or its torch twins where the kernel does not apply (autograd, other dtypes)."""

from __future__ import annotations

from torch import Tensor, nn

from hybridlm.ops import native
from hybridlm.ops.conv import causal_conv1d


def conv_step(x: Tensor, conv_state: Tensor, conv1d: nn.Conv1d) -> Tensor:
    """x [B, C] (this token's channels) -> silu(conv) [B, C]; ``conv_state`` [B, C, K-1] rolls in place."""
    return native.causal_conv_(x, conv_state, _weight(conv1d), conv1d.bias, "silu")


def conv_sequence(x: Tensor, conv_state: Tensor | None, conv1d: nn.Conv1d) -> Tensor:
    """x [B, T, C] -> silu(conv) [B, T, C]; ``conv_state`` [B, C, K-1] (the inputs before x; zeros when
    None) becomes the last K-1 inputs, in place."""
    B, T, C = x.shape
    weight = _weight(conv1d)
    rows = x.reshape(B * T, C)
    state = conv_state if conv_state is not None else rows.new_zeros(B, C, weight.shape[1] - 1)
    if native.causal_conv_applies(rows, state, weight, conv1d.bias, "silu"):  # inference in fp32 on CPU
        return native.causal_conv_(rows, state, weight, conv1d.bias, "silu").view(B, T, C)
    y, new_state = causal_conv1d(x, weight, conv1d.bias, conv_state, "silu")  # differentiable
    if conv_state is not None:
        conv_state.copy_(new_state)
    return y


def _weight(conv1d: nn.Conv1d) -> Tensor:
    """The depthwise kernel [C, K] (the module stores [C, 1, K])."""
    return conv1d.weight.view(conv1d.weight.shape[0], -1)
