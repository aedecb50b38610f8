"""Rotary position embedding (Su et al. 2021), optionally on a leading fraction of each head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hybridlm.ops.precision import upcast


class RotaryEmbedding(nn.Module):
    """cos/sin tables for ``rotary_dim`` dimensions; the rest of the head passes through.

    Uses the rotate-half convention (dims i and i + rotary_dim/2 form a pair), as transformers'
    Llama/Qwen/Nemotron code does.
    """

    def __init__(self, rotary_dim: int, theta: float) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions: [B, T] int -> cos, sin: [B, T, rotary_dim] in fp32."""
        angles = positions.float()[..., None] * self.inv_freq  # [B, T, rotary_dim / 2]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, T, H, D]; cos, sin: [B, T, R] with R <= D -> x with its first R dims rotated."""
    rotary_dim = cos.shape[-1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated = upcast(rotated)
    rotated = (rotated * cos + _rotate_half(rotated) * sin).to(x.dtype)
    return torch.cat((rotated, passed), dim=-1) if passed.shape[-1] else rotated
