"""Causal depthwise 1-D convolution, the short conv in front of every Mamba-2 mixer.

Three functions, one semantics:

- ``causal_conv1d_reference``: an explicit loop over the K kernel taps; the spec.
- ``causal_conv1d``: the same thing as K shifted multiply-adds over the whole sequence.
- ``causal_conv1d_step``: one token of decoding against a rolling state of the last K-1 inputs.

Each output position t sees inputs t-K+1 .. t; positions before the sequence start come from
``initial_state`` (zeros when absent), so a sequence split in two calls with the state carried over
gives the same result as one call. Follows the semantics of the ``causal_conv1d`` package
(Dao-AILab/causal-conv1d, ``causal_conv1d_ref``), but with channels last.

Shape suffixes:
    B  batch
    T  sequence length
    C  channels (depthwise: one kernel per channel)
    K  kernel width
    S  K - 1, the length of the rolling state (the previous K-1 inputs, oldest first)
    L  T + K - 1, the state-prefixed input length
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["causal_conv1d", "causal_conv1d_reference", "causal_conv1d_step"]

_ACTIVATIONS = ("silu", None)


def _check_activation(activation: str | None) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")


def _apply_activation(y: Tensor, activation: str | None) -> Tensor:
    return F.silu(y) if activation == "silu" else y


def _prefix_with_state(x_BTC: Tensor, initial_state_BCS: Tensor | None, kernel_width: int) -> Tensor:
    """Prepend the previous K-1 inputs to ``x``: returns ``[B, T + K - 1, C]``."""
    batch, _, channels = x_BTC.shape
    if initial_state_BCS is None:
        state_BSC = x_BTC.new_zeros(batch, kernel_width - 1, channels)
    else:
        expected = (batch, channels, kernel_width - 1)
        if tuple(initial_state_BCS.shape) != expected:
            raise ValueError(
                f"initial_state must have shape [B, C, K-1] = {list(expected)}, got {list(initial_state_BCS.shape)}"
            )
        state_BSC = initial_state_BCS.transpose(1, 2).to(x_BTC.dtype)
    return torch.cat([state_BSC, x_BTC], dim=1)


def causal_conv1d_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    initial_state: Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv as a loop over the K taps (the spec).

    Args:
        x: ``[B, T, C]`` inputs.
        weight: ``[C, K]`` depthwise kernel (a checkpoint's ``conv1d.weight`` ``[C, 1, K]`` squeezed);
            tap ``K-1`` multiplies the current input.
        bias: ``[C]`` or None.
        initial_state: ``[B, C, K-1]`` the previous K-1 inputs, oldest first; None means zeros.
        activation: ``"silu"`` or None.

    Returns:
        y: ``[B, T, C]``.
        final_state: ``[B, C, K-1]`` the last K-1 inputs (pre-conv), reaching into ``initial_state``
            when ``T < K-1``.
    """
    _check_activation(activation)
    weight_CK = weight
    seq_len = x.shape[1]
    kernel_width = weight_CK.shape[1]
    x_BLC = _prefix_with_state(x, initial_state, kernel_width)

    # y[t] = sum_k weight[:, k] * x_padded[t + k]; x_padded[t + K - 1] is the input at t.
    y_BTC = torch.zeros_like(x)
    for k in range(kernel_width):
        y_BTC = y_BTC + x_BLC[:, k : k + seq_len, :] * weight_CK[:, k]
    if bias is not None:
        y_BTC = y_BTC + bias
    final_state_BCS = x_BLC[:, seq_len:, :].transpose(1, 2).contiguous()
    return _apply_activation(y_BTC, activation), final_state_BCS


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    initial_state: Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv as K shifted multiply-adds over whole sequences; same contract as
    ``causal_conv1d_reference``.

    Channels stay last and nothing of sequence length is copied: each tap adds ``weight[:, k] * x``
    shifted by K-1-k steps into one output buffer, and the taps that reach back before the sequence
    start read ``initial_state`` for the first K-1 outputs only. (``F.conv1d(groups=C)`` needs channels
    first: two transposed copies, and an output whose channel-major strides made its later readers copy
    it again: 2-3x slower in all on the benchmark models' shapes at 512-16K tokens.)

    Args:
        x: ``[B, T, C]``.
        weight: ``[C, K]``.
        bias: ``[C]`` or None.
        initial_state: ``[B, C, K-1]`` or None (zeros).
        activation: ``"silu"`` or None.

    Returns:
        y: ``[B, T, C]`` and final_state: ``[B, C, K-1]``.
    """
    _check_activation(activation)
    seq_len = x.shape[1]
    kernel_width = weight.shape[1]
    state_BSC = _prefix_with_state(x[:, :0], initial_state, kernel_width)  # checked, in x's dtype; zeros if None
    weight_KC = weight.t().contiguous()

    # Tap K-1 multiplies the current input; tap k reads the input K-1-k steps back.
    y_BTC = x * weight_KC[-1] if bias is None else torch.addcmul(bias, x, weight_KC[-1])
    for k in range(kernel_width - 1):
        shift = kernel_width - 1 - k
        if shift < seq_len:
            y_BTC[:, shift:].addcmul_(x[:, : seq_len - shift], weight_KC[k])
        if initial_state is not None:  # outputs t < shift read state[t + k]
            rows = min(shift, seq_len)
            y_BTC[:, :rows].addcmul_(state_BSC[:, k : k + rows], weight_KC[k])

    # The last K-1 inputs of state + x (reaching into the state when T < K-1), from at most 2(K-1) rows.
    recent_BLC = torch.cat([state_BSC, x[:, max(0, seq_len - (kernel_width - 1)) :]], dim=1)
    final_state_BCS = recent_BLC[:, recent_BLC.shape[1] - (kernel_width - 1) :].transpose(1, 2).contiguous()
    if activation == "silu":
        y_BTC = F.silu(y_BTC, inplace=True)  # y is this function's own buffer
    return y_BTC, final_state_BCS


def causal_conv1d_step(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[Tensor, Tensor]:
    """One decoding step. Does not modify ``conv_state``; returns the rolled state as a new tensor.

    Args:
        x: ``[B, C]`` the current token's input.
        conv_state: ``[B, C, K-1]`` the previous K-1 inputs, oldest first.
        weight: ``[C, K]``.
        bias: ``[C]`` or None.
        activation: ``"silu"`` or None.

    Returns:
        y: ``[B, C]``.
        new_state: ``[B, C, K-1]`` = the last K-1 inputs including ``x``.
    """
    _check_activation(activation)
    window_BCK = torch.cat([conv_state.to(x.dtype), x.unsqueeze(-1)], dim=-1)
    y_BC = (window_BCK * weight).sum(dim=-1)
    if bias is not None:
        y_BC = y_BC + bias
    new_state_BCS = window_BCK[:, :, 1:].contiguous()
    return _apply_activation(y_BC, activation), new_state_BCS
